"""The exceptions nabla raises for user mistakes.

Every error a user can cause (a missing file, a bad setting, a prompt too long)
is one of these, with a message that names the value and says what to do.
`assert` is kept for internal invariants only.
"""


class NablaError(Exception):
    """Base class of every error nabla raises on purpose."""


class ConfigError(NablaError, ValueError):
    """A model configuration (params.json, config.json, flags) is invalid."""


class CheckpointError(NablaError):
    """A checkpoint folder or weight file is missing, truncated or does not fit the model."""


class TokenizerError(NablaError):
    """A tokenizer file is missing, unreadable or does not fit the model."""


class InvalidRequestError(NablaError, ValueError):
    """A generation request has an invalid argument (temperature, top_p, prompts...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""
