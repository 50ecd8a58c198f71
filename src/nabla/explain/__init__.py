"""Why the model chose each token (explain), how surprised it is by a text (score), and the page
that shows either (html)."""

from nabla.explain.explain import Alternative, Explanation, TokenExplanation, explain, token_stats
from nabla.explain.score import ScoredText, score

__all__ = ["Alternative", "TokenExplanation", "Explanation", "ScoredText", "token_stats", "explain", "score"]
