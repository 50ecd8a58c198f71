"""llama.cpp as `nabla bench`'s peer, through llama-cpp-python's C API.

The model is written to GGUF from the very tensors nabla runs
(nabla.checkpoint.gguf), then timed the way bench times nabla: the prompts of
every sequence in one llama_decode, then greedy steps of one token per
sequence, each sequence in its own slot of llama.cpp's cache (n_seq_max =
batch size), on the CPU with the same thread count.

Leaves out: installing llama.cpp (the error says how) and its GPU builds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import time

import numpy as np

from nabla.errors import ConfigError

INSTALL_HINT = ("llama-cpp-python is not installed; `pip install llama-cpp-python gguf` builds llama.cpp "
                "from source (many minutes on a small machine), then run `nabla bench --vs llama.cpp` again")


def check_installed() -> None:
    for module, hint in (("llama_cpp", INSTALL_HINT), ("gguf", "`pip install gguf` (writes the GGUF file)")):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(hint if module == "llama_cpp" else f"--vs llama.cpp needs the gguf package: {hint}")


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp logs every load to stderr otherwise
    pass


class LlamaCpp:
    """One llama.cpp model and context for `batch_size` sequences of up to `seq_len` tokens each."""

    def __init__(self, gguf_path, batch_size: int, seq_len: int, threads: int, prompt_len: int = 512):
        self.ctx = self.model = None  # close() has nothing to free if the import or the load fails
        import llama_cpp as lc

        self.lc = lc
        lc.llama_log_set(_quiet, None)
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise ConfigError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        per_seq = -(-seq_len // 256) * 256
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = batch_size * per_seq
        cparams.n_batch = cparams.n_ubatch = max(512, batch_size * prompt_len)
        cparams.n_seq_max = batch_size
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ConfigError("llama.cpp could not make a context (out of memory?)")
        self.B = batch_size
        self.capacity = max(batch_size * prompt_len, batch_size)
        self.batch = lc.llama_batch_init(self.capacity, 0, batch_size)

    def close(self) -> None:
        if self.ctx:
            lc = self.lc
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            lc.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------
    def _decode(self, rows: list[list[int]], start: int, all_logits: bool = False) -> None:
        b, n = self.batch, 0
        for s, toks in enumerate(rows):
            for t, tok in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, start + t, 1
                b.seq_id[n][0] = s
                b.logits[n] = all_logits or t == len(toks) - 1
                n += 1
        if n > self.capacity:
            raise ConfigError(f"{n} tokens in one llama.cpp batch, more than the {self.capacity} allocated")
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _row(self, i: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def logits(self, prompt: list[int]) -> np.ndarray:
        """(len(prompt), vocab) logits of one sequence: for checking the GGUF against nabla."""
        self._reset()
        self._decode([prompt], 0, all_logits=True)
        return np.stack([self._row(i).copy() for i in range(len(prompt))])

    def time(self, tokens: list[list[int]], gen_len: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds): every prompt in one decode, then greedy steps."""
        P = len(tokens[0])
        self._reset()
        t0 = time.perf_counter()
        self._decode(tokens, 0)
        self.lc.llama_synchronize(self.ctx)
        t1 = time.perf_counter()
        # Output rows are numbered in batch order: sequence s's last prompt token is row s*P + P-1.
        nxt = [int(self._row(s * P + P - 1).argmax()) for s in range(self.B)]
        for i in range(gen_len):
            self._decode([[t] for t in nxt], P + i)
            nxt = [int(self._row(s).argmax()) for s in range(self.B)]
        self.lc.llama_synchronize(self.ctx)
        return t1 - t0, time.perf_counter() - t1
