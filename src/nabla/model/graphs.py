"""Decode steps recorded once as a device graph and replayed (CUDA graphs).

A decode step of a small batch launches hundreds of tiny kernels; on a GPU
the host's launch cost, not the card, then sets the pace (measured on an H200:
a 7B model at batch 1 took 21 ms a step where reading its weights takes 3.4).
A recorded graph replays every kernel of the step with one launch.

A graph replays fixed shapes and fixed memory, so the recorded step reads the
token and positions from buffers it owns, and attends over a fixed number of
cache positions with a mask (Transformer.forward's `cache_len`), rounded up to
a multiple of BUCKET so that short contexts do not pay for the whole cache:
one graph per (batch size, bucket), recorded on first use. Stale keys past a
sequence's position are masked, and each position is written before it is
first read, so the warm-up runs of a recording may scribble past the end of
what is cached.

Where the device records no graphs (CPU, MPS), outside inference mode, on a
model with forward hooks or split across processes, `StepGraphs` simply calls
the model. Leaves out: prefill (one pass per request, its shape changes) and
torch.compile.
"""

from __future__ import annotations

import math
import warnings

import torch

from nabla import device as devices

BUCKET = 256


def plain_steps(model) -> None:
    """Make `model.decode` run the forward at every step, recording nothing (to compare
    against), until the next setup_cache."""
    model.step_graphs = StepGraphs(model)
    model.step_graphs.failed = True


class StepGraphs:
    def __init__(self, model):
        self.model = model
        self.graphs: dict[tuple[int, int], tuple] = {}  # (B, cache_len) -> (replay, tokens, pos, logits)
        self.pool = None
        self.key = None
        self.failed = False

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        model = self.model
        if tokens.shape[1] != 1 or not torch.is_inference_mode_enabled() or model.training or \
                self.failed or not devices.records_graphs(tokens.device) or self._hooked():
            return model(tokens, start_pos, last_only=True)
        self._check_memory_unchanged()
        B = tokens.shape[0]
        cache = model.layers[0].attention.cache
        limit = cache.k.shape[2]
        cache_len = min(limit, BUCKET * math.ceil((start_pos + 1) / BUCKET))
        entry = self.graphs.get((B, cache_len))
        if entry is None:
            try:
                entry = self.graphs[(B, cache_len)] = self._record(B, cache_len, tokens.device)
            except RuntimeError as e:  # an op that cannot be recorded: run the model as it is
                warnings.warn(f"nabla: decoding without graphs, recording one failed: {e}", stacklevel=2)
                self.failed = True
                return model(tokens, start_pos, last_only=True)
        replay, tok_buf, pos_buf, logits = entry
        tok_buf.copy_(tokens)
        pos_buf.fill_(start_pos)
        replay()
        return logits

    def _record(self, B: int, cache_len: int, device: torch.device):
        tok_buf = torch.zeros(B, 1, dtype=torch.long, device=device)
        # Warm-up and recording write at the bucket's last position, past anything cached (see above).
        pos_buf = torch.full((B,), cache_len - 1, dtype=torch.long, device=device)

        def step():
            return self.model(tok_buf, pos_buf, last_only=True, cache_len=cache_len)

        replay, logits, self.pool = devices.record_graph(step, device, self.pool)
        return replay, tok_buf, pos_buf, logits

    def _hooked(self) -> bool:
        """Forward hooks (nabla.distributed.lead, a user's) must see every step; a replay skips them.
        A model split across processes is left alone too (its collectives are not recorded)."""
        m = self.model
        return bool(m._forward_pre_hooks or m._forward_hooks) or (
            torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)

    def _check_memory_unchanged(self) -> None:
        """Forget the graphs if the weights or the cache moved (a graph reads fixed addresses)."""
        m = self.model
        key = (m.tok_embeddings.weight.data_ptr(), m.output.weight.data_ptr(),
               m.layers[0].attention.cache.k.data_ptr(), m.layers[-1].attention.cache.v.data_ptr())
        if key != self.key:
            self.graphs.clear()
            self.key = key
