"""The public API, a drop-in for Meta's `llama.Llama`.

`Llama.build` opens a checkpoint on the best device there is (no torchrun,
no process group, no CUDA needed); `generate`, `text_completion` and
`chat_completion` take the reference's arguments and return what it returns.
`stream` yields a single prompt's tokens and text as they are produced.
With `prefix_cache_mb`, prompts that start as an earlier one did (a system
prompt, the earlier turns of a chat) reuse its keys and values
(nabla.model.prefix_cache): the same logits, bit for bit, sooner.

Leaves out: the model's preparation for its device (nabla.model.prepare), the
decode loop and sampling (nabla.generation), prompt formats
(nabla.tokenizer.chat), serving many clients (nabla.server).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch

from nabla import device as devices
from nabla.checkpoint import open_checkpoint
from nabla.checkpoint.meta import load_into
from nabla.errors import ConfigError, InvalidRequestError, TokenizerError
from nabla.generation.checks import check_prompts, check_sampling
from nabla.generation.constraints import Grammar
from nabla.generation.loop import collect, decode_steps, new_batch
from nabla.model.llama import Transformer
from nabla.model.prefix_cache import MIN_PASS, PrefixCache
from nabla.model.prepare import prepare_model
from nabla.tokenizer import Tokenizer, load_tokenizer
from nabla.tokenizer.base import IncrementalDecoder
from nabla.tokenizer.chat import (
    UNSAFE_ERROR,
    Dialog,
    chat_format_for,
    check_dialog,
    check_template_kwargs,
    has_special_tags,
)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: dict  # {"role": "assistant", "content": str}
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


@dataclass
class StreamPiece:
    """One generated token: its id, the text it adds, and its logprob (if asked)."""

    token: int
    text: str
    logprob: float | None = None


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        verbose: bool = False,
        quantize: str | None = None,
        adapter: str | Path | None = None,
        merge_adapter: bool = True,
        prefix_cache_mb: float = 0,
    ) -> Llama:
        """Load a checkpoint folder and its tokenizer, ready to generate.

        `tokenizer_path` may be None when the folder holds its tokenizer.
        `device` None picks CUDA, then MPS, then CPU; `dtype` None picks the
        device's compute dtype (fp32 on CPU, bf16 on CUDA, fp16 on MPS); "auto"
        keeps the checkpoint's dtype where the device supports it. `quantize`
        "int8" or "int4" stores the linear layers' weights in fewer bits
        (nabla.model.quantize). `adapter` is a LoRA adapter folder in PEFT's
        layout (nabla.checkpoint.peft): merged into the weights as they load
        (`merge_adapter`, before any quantization), or applied at run time.
        `prefix_cache_mb` > 0 keeps the keys and values of that many megabytes of
        prompt prefixes for later prompts that start the same way (`Llama.prefix_cache`).
        """
        start = time.time()
        from nabla.distributed import model_parallel_world, shard_model

        mp = model_parallel_world(model_parallel_size)  # 1, or the torchrun world the model is split across
        if quantize is not None and mp > 1:
            raise ConfigError(f"quantize={quantize!r} is not supported with model_parallel_size={mp} yet; "
                              "use one or the other")
        ckpt = open_checkpoint(ckpt_dir)
        saved = ckpt.quantization  # a folder `nabla convert --quantize` wrote: load it as it is
        if saved is not None:
            if quantize not in (None, saved["mode"]):
                raise ConfigError(f"{ckpt.path} is already quantized to {saved['mode']}; drop quantize="
                                  f"{quantize!r}, or quantize the original checkpoint instead")
            if mp > 1:
                raise ConfigError(f"{ckpt.path} is quantized ({saved['mode']}), which is not supported with "
                                  f"model_parallel_size={mp} yet; split the original checkpoint instead")
            quantize = None
        stored = None  # a GGUF file's layers, quantized as they are read (checkpoint.gguf_quantized)
        if ckpt.format == "gguf" and mp == 1 and (quantize or ckpt.load_quantize):
            from nabla.checkpoint.gguf_quantized import quantized_state

            stored = quantized_state(ckpt, quantize)  # the file's own mode unless one is asked for
            if stored is None:
                quantize = quantize or ckpt.load_quantize  # dequantized, then quantized as a whole
            else:
                quantize, saved = None, stored[2]
        tok_path = tokenizer_path if tokenizer_path is not None else ckpt.tokenizer_path
        if tok_path is None and ckpt.format == "gguf":
            tokenizer = ckpt.tokenizer()  # from the file's metadata
            tok_path = ckpt.path
        elif tok_path is None:
            raise TokenizerError(f"{ckpt.path} holds no tokenizer.model; pass tokenizer_path "
                                 "(--tokenizer FILE) pointing to the model's tokenizer")
        else:
            tokenizer = load_tokenizer(tok_path, model_dir=ckpt.path)  # stop ids: also the config's eos ids
        args = ckpt.args if stored is None else stored[1]
        state = ckpt.load_state() if stored is None else stored[0]
        emb = ckpt.shapes.get("tok_embeddings.weight")  # the shape only: reading it would join MP shards
        if args.vocab_size == -1:  # Meta's params.json: "take it from the tokenizer"
            args.vocab_size = emb[0] if emb is not None else tokenizer.n_words
        if tokenizer.n_words > args.vocab_size:
            raise TokenizerError(
                f"the tokenizer {tok_path} has {tokenizer.n_words} ids but the model's embedding has only "
                f"{args.vocab_size} rows; this tokenizer does not belong to this checkpoint")

        lora = None
        if adapter is not None:
            from nabla.checkpoint.peft import read_adapter

            if mp > 1:
                raise ConfigError(f"adapter= is not supported with model_parallel_size={mp} yet; merge it first "
                                  "(nabla convert --merge-adapter) and split the merged model")
            lora = read_adapter(adapter, args)
            merge_adapter = merge_adapter and saved is None  # stored int8/int4 weights: apply at run time
        dev = devices.choose_device(device)
        dt = devices.resolve_dtype(dtype, dev, ckpt.dtype)  # "auto": keep the checkpoint's dtype
        with torch.device("meta"):
            model = Transformer(args)
        if mp > 1:  # tensor parallel: this rank's layers and its slice of every weight
            state = shard_model(model, state, mp, dev, ckpt)

        def load_weights(m: Transformer) -> None:
            nonlocal state
            load_into(m, state, source=str(ckpt.path), progress=verbose or ckpt.show_progress)
            state = None  # drop the checkpoint's tensors before the layers are swapped
            if lora is not None and merge_adapter:
                from nabla.checkpoint.peft import merge_adapter as merge_into

                merge_into(m, lora)  # before quantization and kernel swaps, in the weights' dtype

        model = prepare_model(model, dev, dt, load_weights, max_batch_size=max_batch_size,
                              max_seq_len=max_seq_len, quantize=quantize, quantized=saved, sharded=mp > 1)
        if lora is not None and not merge_adapter:
            from nabla.checkpoint.peft import apply_adapter

            apply_adapter(model, lora).eval()
        if ckpt.context_length and max_seq_len > ckpt.context_length:
            warnings.warn(f"max_seq_len={max_seq_len} is longer than the {ckpt.context_length} tokens "
                          f"{ckpt.path.name} was trained for; text past that may degrade", stacklevel=2)
        # Seed last, so the first sample draws from a freshly seeded stream
        # whatever loading did; every rank seeds the same way.
        torch.manual_seed(seed)
        if verbose:
            dt = model.tok_embeddings.weight.dtype  # the compute dtype (fp32 under bf16 weights)
            print(f"Loaded {ckpt.path} ({ckpt.format}) on {dev} in {dt} in {time.time() - start:.2f} seconds")
        try:
            prefix_cache = PrefixCache.of_megabytes(prefix_cache_mb)
        except ValueError as e:
            raise ConfigError(f"prefix_cache_mb: {e}") from None
        if prefix_cache is not None and mp > 1:  # other ranks follow rank 0's passes, not its cache copies
            warnings.warn("the prefix cache is off under tensor parallelism", stacklevel=2)
            prefix_cache = None
        return Llama(model, tokenizer, prefix_cache=prefix_cache)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache
        """Keys and values of earlier prompts' prefixes, reused by generate and stream (None: off)."""
        self.tokenizer = tokenizer
        self.chat_format = chat_format_for(tokenizer)
        self.device = next(model.parameters()).device
        self.stop_ids = tuple(tokenizer.stop_ids)

    @property
    def max_seq_len(self) -> int:
        """The context: positions the model's key/value cache holds."""
        return self.model.layers[0].attention.cache.k.shape[2]

    @property
    def max_batch_size(self) -> int:
        """Sequences the model's key/value cache holds."""
        return self.model.layers[0].attention.cache.k.shape[0]

    def check_prompts(self, prompt_tokens) -> list[list[int]]:
        """Token-id prompts as `generate` takes them, checked against this model's batch, vocabulary and context."""
        return check_prompts(prompt_tokens, self.max_batch_size, self.model.args.vocab_size, self.max_seq_len)

    # ------------------------------------------------------------- reference
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        json_schema: dict | bool | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of token-id prompts, exactly as Meta's `generate`.

        With `json_schema` (a JSON Schema dict, or True for any JSON object) every
        continuation is decoded under that grammar (nabla.generation.constraints).
        """
        prompts = self.check_prompts(prompt_tokens)
        check_sampling(temperature, top_p, max_gen_len)
        batch = new_batch(prompts, max_gen_len, self.max_seq_len, self.tokenizer.pad_id, logprobs, self.device)
        matchers = self._matchers(json_schema, len(prompts))
        cached = self._reuse_prefix(batch, logprobs)
        for i, _ in enumerate(decode_steps(self.model, batch, temperature, top_p, self.stop_ids,
                                           self.tokenizer.pad_id, matchers=matchers, cached=cached)):
            if i == 0:
                self._keep_prefix(batch, cached)
        return collect(batch, max_gen_len, echo, set(self.stop_ids))

    def _matchers(self, json_schema: dict | bool | None, n: int) -> list | None:
        """One grammar matcher per row for `json_schema` (compiled once), or None."""
        if json_schema is None or json_schema is False:
            return None
        grammar = Grammar.json(self.tokenizer, None if json_schema is True else json_schema,
                               self.model.args.vocab_size)
        return [grammar.matcher() for _ in range(n)]

    def _reuse_prefix(self, batch, logprobs: bool = False) -> int:
        """Copy each row's longest cached prefix into its cache row; the positions the prefill may skip
        (the same for every row, as decoding starts at one position for all). Not with logprobs: Meta's
        logprobs take a log-softmax across the prefill's positions, whose rounding depends on their number."""
        cache, lens = self.prefix_cache, batch.prompt_lens
        min_len = min(lens)
        if cache is None or logprobs or min_len >= batch.total_len:
            return 0
        rows = batch.tokens[:, :min_len].tolist()
        found = [cache.match(r) for r in rows]
        n = min(map(len, found))
        for i, keys in enumerate(found):
            cache.load(self.model, i, keys[:n])
        return n * cache.block_size

    def _keep_prefix(self, batch, cached: int) -> None:
        """After the prefill: keep the rows' prompt blocks that the prefill computed in one pass."""
        min_len = min(batch.prompt_lens)
        if self.prefix_cache is None or min_len - cached < MIN_PASS or min_len >= batch.total_len:
            return
        for i, row in enumerate(batch.tokens[:, :min_len].tolist()):
            self.prefix_cache.store(self.model, i, row, min_len)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        json_schema: dict | bool | None = None,
    ) -> list[CompletionPrediction]:
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if isinstance(prompts, str):
            raise InvalidRequestError("prompts must be a list of strings; wrap a single prompt in a list",
                                      "prompt")
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequestError("prompts must be a list of strings", "prompt")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, json_schema)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(tokens, lps)]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        json_schema: dict | bool | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[ChatPrediction]:
        """Answer each dialog. `chat_template_kwargs` are further variables for the model's Jinja chat
        template, as in transformers and vLLM: {"enable_thinking": False} for Qwen3, say."""
        variables = check_template_kwargs(chat_template_kwargs)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise InvalidRequestError("dialogs must be a non-empty list of dialogs", "messages")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        unsafe = [has_special_tags(d) for d in dialogs]
        prompt_tokens = [self.encode_chat(d, variables) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                    json_schema=json_schema)

        def message(t, bad):
            return {"role": "assistant", "content": UNSAFE_ERROR if bad else self.tokenizer.decode(t)}

        if logprobs:
            return [{"generation": message(t, bad), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp, bad in zip(tokens, lps, unsafe)]
        return [{"generation": message(t, bad)} for t, bad in zip(tokens, unsafe)]

    # -------------------------------------------------------------- streaming
    def stream(
        self,
        prompt: str | Sequence[int],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        *,
        in_context: bool = False,
        json_schema: dict | bool | None = None,
    ) -> Iterator[StreamPiece]:
        """Yield each new token of one prompt (text, or token ids) as it is produced.

        The same tokens as `generate([prompt], ...)`; the `text` pieces join to
        `decode` of the generated ids, or with `in_context` to the text as it
        reads after the prompt (the first piece keeps its leading space).
        Stops at a stop token (not yielded).
        """
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt, bos=True, eos=False)
        (ids,) = self.check_prompts([prompt])
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - len(ids)
        check_sampling(temperature, top_p, max_gen_len)
        matchers = self._matchers(json_schema, 1)
        return self._stream(ids, max_gen_len, temperature, top_p, logprobs, in_context, matchers)

    def _stream(self, ids, max_gen_len, temperature, top_p, logprobs, in_context,
                matchers=None) -> Iterator[StreamPiece]:
        batch = new_batch([ids], max_gen_len, self.max_seq_len, self.tokenizer.pad_id, logprobs, self.device)
        text = IncrementalDecoder(self.tokenizer, ids if in_context else ())
        pending = None  # a token whose text is held back (an unfinished UTF-8 character)
        cached = self._reuse_prefix(batch, logprobs)
        steps = decode_steps(self.model, batch, temperature, top_p, self.stop_ids, self.tokenizer.pad_id,
                             matchers=matchers, cached=cached)
        for pos in steps:
            if pos == len(ids):
                self._keep_prefix(batch, cached)
            if pos - len(ids) >= max_gen_len:
                break
            token = int(batch.tokens[0, pos])
            if token in self.stop_ids:
                break
            piece = StreamPiece(token, text.push(token), float(batch.token_logprobs[0, pos]) if logprobs else None)
            if pending is not None:
                yield pending
                pending = None
            if piece.text:
                yield piece
            else:
                pending = piece
        if pending is not None:
            pending.text += text.flush()
            yield pending

    def explain(
        self,
        prompt: str | Sequence[int],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k_shown: int = 5,
        echo: bool = False,
        seed: int | None = None,
    ):
        """Generate from one prompt and say, for every token, what the model weighed.

        Returns a nabla.explain.Explanation: per position the chosen
        token, its probability and logprob, the top-k alternatives before and
        after temperature and top-p, the nucleus size and the entropy. The
        tokens are those `generate` picks after `torch.manual_seed(seed)`.
        """
        from nabla.explain import explain  # the one call up a layer: kept for the public API

        return explain(self, prompt, max_gen_len, temperature, top_p, top_k_shown, echo, seed)

    def encode_chat(self, dialog: Dialog, chat_template_kwargs: dict | None = None) -> list[int]:
        """Prompt token ids of a dialog in the model's chat format (`chat_template_kwargs`: further
        variables for a Jinja chat template; Meta's formats take none)."""
        if chat_template_kwargs:
            return self.chat_format.encode_dialog(dialog, template_kwargs=chat_template_kwargs)
        return self.chat_format.encode_dialog(dialog)
