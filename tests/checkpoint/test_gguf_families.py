"""GGUF in and out for every family nabla runs (nabla.checkpoint.gguf_families), against transformers.

Per family (tiny random models transformers builds and saves in fp32):
- nabla's writer, read back by nabla: f32 gives transformers' logits; q8_0 gives the logits of
  transformers run on the weights `gguf.quants` quantizes and dequantizes (llama.cpp's block arithmetic);
- a file written here the way llama.cpp's convert_hf_to_gguf.py writes the family, straight from the
  transformers state dict with the gguf package's GGUFWriter and its HF -> GGUF tensor-name map (not
  nabla's code), opens in nabla with transformers' logits;
- where llama-cpp-python is installed, llama.cpp runs nabla's file with transformers' logits.
Tokenizers: tokenizer.json vocabularies (SentencePiece-style, with and without the leading space, and a
Qwen2-style byte-level BPE) written by nabla encode like the `tokenizers` original. Bad input is one
clear error naming the file.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from conftest import TINYLLAMA_DIR  # noqa: E402
from hf_families import WINDOW, save_family  # noqa: E402

from nabla import Llama  # noqa: E402
from nabla.checkpoint import open_checkpoint  # noqa: E402
from nabla.checkpoint.gguf import write_gguf  # noqa: E402
from nabla.errors import CheckpointError, ConfigError  # noqa: E402
from nabla.model import Transformer  # noqa: E402
from nabla.model.args import ModelArgs  # noqa: E402
from nabla.tokenizer import load_tokenizer  # noqa: E402

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.3 * i for i in range(8)]}
CASES = {  # test name -> (hf_families family, extra config)
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=24)),  # llama.cpp's gemma2 scales by the head size
    "phi3": ("phi3", {}),
    # llama.cpp picks the long factors from its context (256 here) and transformers from the prompt's length:
    # both pick the short ones when the original context is 256
    "phi3-longrope": ("phi3", dict(rope_scaling=LONGROPE, original_max_position_embeddings=256,
                                   max_position_embeddings=1024, sliding_window=None)),
}
ARCH = {"mistral": "llama", "phi3-longrope": "phi3"}
VOCAB = 512  # small, so that each file's vocabulary (a stand-in one here) reads quickly
PROMPT = [1, 45, 300, 17, 200, 99, 411, 3, 256, 78, 500, 12]  # past the window of 6
TEXTS = ["Hello world, how are you?", "  spaces   and\nnewlines\t", "émoji 🦙 中文 1234567", "I'll say: don't 42!!"]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, extra = CASES[request.param]
    path, hf = save_family(tmp_path_factory.mktemp(request.param), family, vocab_size=VOCAB, **extra)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    return request.param, path, hf, want


@pytest.fixture(scope="module")
def written(case, tmp_path_factory):
    """nabla's f32 GGUF of the case's model."""
    return write_nabla(tmp_path_factory.mktemp("gguf") / "m.gguf", case[1])


def nabla_logits(path) -> torch.Tensor:
    """nabla's logits from a checkpoint's weights exactly as it reads them (no int8/int4 requantization)."""
    ckpt = open_checkpoint(path)
    model = Transformer(ckpt.args).eval()
    result = model.load_state_dict(dict(ckpt.load_state()), strict=False)
    tied = {"output.weight"} if ckpt.args.tie_word_embeddings else set()
    assert not result.unexpected_keys and all(k.startswith("rope") or k in tied for k in result.missing_keys)
    if tied:
        assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        return model(torch.tensor([PROMPT]))[0]


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def write_nabla(path, folder, qtype="f32"):
    """With a stand-in vocabulary: the tokenizers nabla writes are checked below, on their own."""
    ckpt = open_checkpoint(folder)
    return write_gguf(path, ckpt.load_state(), ckpt.args, None, qtype, context_length=ckpt.context_length)


# ------------------------------------------------------------------ nabla's writer, read back
def test_f32_round_trip_gives_transformers_logits(case, written):
    name, folder, hf, want = case
    path = written
    meta = fields(path)
    assert meta["general.architecture"] == ARCH.get(name, name)
    got = open_checkpoint(path)
    src = open_checkpoint(folder).args
    for k in ("model_type", "qkv_bias", "qk_norm", "norm_unit_offset", "hidden_act", "scale_embeddings",
              "sliding_window", "sliding_layers", "post_norms", "tie_word_embeddings", "head_dim", "hidden_dim"):
        assert getattr(got.args, k) == getattr(src, k), k
    for k in ("attn_logit_softcap", "final_logit_softcap", "attn_scale", "norm_eps", "rope_theta"):
        assert getattr(got.args, k) == pytest.approx(getattr(src, k)), k
    assert (got.args.rope_scaling is None) == (src.rope_scaling is None)
    if src.rope_scaling:
        for k, v in src.rope_scaling.items():
            assert got.args.rope_scaling[k] == pytest.approx(v), k
    torch.testing.assert_close(nabla_logits(path), want, atol=1e-4, rtol=0)


def quantized_copy(hf, qtype):
    """The transformers model with every matrix (embedding too) replaced by its block-quantized values."""
    import copy

    q = copy.deepcopy(hf)
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                x = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
                                         .reshape(x.shape)))
    return q


def test_q8_0_gives_the_block_quantized_weights_logits(case, tmp_path):
    name, folder, hf, _ = case
    path = write_nabla(tmp_path / "m.gguf", folder, "q8_0")
    assert open_checkpoint(path).load_quantize == "int8"
    with torch.no_grad():
        want = quantized_copy(hf, gguf.GGMLQuantizationType.Q8_0)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(nabla_logits(path), want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ llama.cpp's converter, read by nabla
def permute_llama(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rows -> adjacent pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converter_gguf(path, hf, name, drop=(), extra=None):
    """A GGUF written from the transformers model the way convert_hf_to_gguf.py writes `name`'s family."""
    cfg = hf.config
    arch = ARCH.get(name, name)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    w = gguf.GGUFWriter(path, arch)
    K = gguf.Keys
    kv = {K.LLM.CONTEXT_LENGTH: cfg.max_position_embeddings, K.LLM.EMBEDDING_LENGTH: cfg.hidden_size,
          K.LLM.BLOCK_COUNT: cfg.num_hidden_layers, K.LLM.FEED_FORWARD_LENGTH: cfg.intermediate_size,
          K.Attention.HEAD_COUNT: n_head, K.Attention.HEAD_COUNT_KV: n_kv,
          K.Attention.LAYERNORM_RMS_EPS: cfg.rms_norm_eps}
    if not arch.startswith("gemma"):
        kv[K.Rope.FREQ_BASE] = rope["rope_theta"]
    if getattr(cfg, "head_dim", None) is not None:
        kv[K.Attention.KEY_LENGTH] = kv[K.Attention.VALUE_LENGTH] = head_dim
    if arch in ("llama", "phi3"):
        kv[K.Rope.DIMENSION_COUNT] = head_dim
    if arch == "llama":
        kv[K.LLM.VOCAB_SIZE] = cfg.vocab_size
    if arch == "gemma2":
        kv.update({K.LLM.ATTN_LOGIT_SOFTCAPPING: cfg.attn_logit_softcapping,
                   K.LLM.FINAL_LOGIT_SOFTCAPPING: cfg.final_logit_softcapping,
                   K.Attention.SLIDING_WINDOW: cfg.sliding_window})
    if arch == "phi3":
        kv[K.Attention.SLIDING_WINDOW] = cfg.sliding_window or 0
        kv[K.Rope.SCALING_ORIG_CTX_LEN] = rope.get("original_max_position_embeddings",
                                                  cfg.original_max_position_embeddings)
    kv.update(extra or {})
    for key, value in kv.items():
        if key in drop:
            continue
        key = key.format(arch=arch)
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    # a stand-in SentencePiece vocabulary; the logits are what this test checks
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), cfg.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(cfg.vocab_size - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope.get("rope_type") == "longrope":
        factor = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        w.add_string(K.Rope.SCALING_TYPE.format(arch=arch), "longrope")
        w.add_float32(K.Rope.SCALING_ATTN_FACTOR.format(arch=arch),
                      float(np.sqrt(1 + np.log(factor) / np.log(rope["original_max_position_embeddings"]))))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and (cfg.tie_word_embeddings or arch.startswith("gemma")):
            continue
        t = t.detach().float()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = permute_llama(t, n_head)
        if arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = permute_llama(t, n_kv)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            t = t + 1
        out = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert out is not None, hf_name
        w.add_tensor(out, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_converter_style_file_gives_transformers_logits(case, tmp_path):
    name, folder, hf, want = case
    path = converter_gguf(tmp_path / "ref.gguf", hf, name)
    got = nabla_logits(path)
    if name == "mistral":  # the converter drops Mistral's window (llama.cpp has none for llama): equal up to it
        assert open_checkpoint(path).args.sliding_window is None
        got, want = got[:WINDOW], want[:WINDOW]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_our_file_with_transformers_logits(case, written):
    from nabla.bench.llamacpp import LlamaCpp

    name, folder, hf, want = case
    cpp = LlamaCpp(written, 1, 32, 1)
    try:
        theirs = cpp.logits(PROMPT)
    finally:
        cpp.close()
    want = want.numpy()
    if getattr(hf.config, "sliding_window", None) and name != "gemma2":
        # llama.cpp runs llama (Mistral) and phi3 without their sliding window: equal up to it only
        theirs, want = theirs[:WINDOW], want[:WINDOW]
    np.testing.assert_allclose(theirs, want, atol=2e-3)
    assert (theirs.argmax(-1) == want.argmax(-1)).all()


# ------------------------------------------------------------------ tokenizers
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_tokens(path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's own tokenization of each text with the vocabulary of the GGUF file at `path`."""
    import llama_cpp as lc

    from nabla.bench.llamacpp import _quiet

    lc.llama_log_set(_quiet, None)
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load the vocabulary of {path}"
    try:
        vocab = lc.llama_model_get_vocab(model)
        out = []
        for text in texts:
            data = text.encode()
            buf = (lc.llama_token * (4 * len(data) + 8))()
            n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
            assert n >= 0, text
            out.append(list(buf[:n]))
        return out
    finally:
        lc.llama_model_free(model)


def tokenizer_folder(tmp_path, edit=None):
    folder = tmp_path / "tok"
    shutil.copytree(TINYLLAMA_DIR, folder)
    if edit:
        j = json.loads((folder / "tokenizer.json").read_text())
        edit(j)
        (folder / "tokenizer.json").write_text(json.dumps(j))
    return folder


def no_leading_space(j):
    """Gemma's way: spaces become "▁" but nothing is prepended."""
    j["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    j["decoder"]["decoders"] = [d for d in j["decoder"]["decoders"] if d["type"] != "Strip"]


@pytest.mark.parametrize("edit,space", [(None, True), (no_leading_space, False)])
def test_sentencepiece_style_tokenizer_json_round_trips(tmp_path, edit, space):
    from nabla.tokenizer.gguf import gguf_tokenizer

    folder = tokenizer_folder(tmp_path, edit)
    orig = load_tokenizer(folder / "tokenizer.json")
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=32)
    state = {"tok_embeddings.weight": torch.zeros(args.vocab_size, args.dim)}
    path = write_gguf(tmp_path / "t.gguf", state, args, orig, "f32")
    meta = fields(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is space
    ours = gguf_tokenizer(meta, "t.gguf")
    texts = TEXTS + [" leading space", "tab\tand\n\n text"]
    for s in texts:
        assert ours.encode(s, bos=True, eos=False) == orig.encode(s, bos=True, eos=False), s
        ids = orig.encode(s, bos=False, eos=False)
        assert ours.decode(ids) == orig.decode(ids), s
    if HAVE_LLAMA_CPP:  # llama.cpp's SentencePiece tokenizer on the scores nabla wrote
        assert llama_cpp_tokens(path, texts) == [orig.encode(s, bos=False, eos=False) for s in texts]


def qwen2_tokenizer(folder):
    """A tiny Qwen2-style byte-level BPE (Qwen2's split regex, its special tokens), trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from nabla.tokenizer.gguf import QWEN2_PATTERN

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    text = (TINYLLAMA_DIR.parent / "tinystories-v1-head.txt").read_text()[:20000]
    tk.train_from_iterator([text, *TEXTS], trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False}))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    return tk


def test_qwen2_byte_level_tokenizer_round_trips(tmp_path):
    tk = qwen2_tokenizer(tmp_path / "qwen")
    orig = load_tokenizer(tmp_path / "qwen" / "tokenizer.json")
    folder, hf = save_family(tmp_path / "m", "qwen2", vocab_size=512)
    shutil.copy(tmp_path / "qwen" / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(tmp_path / "qwen" / "tokenizer_config.json", folder / "tokenizer_config.json")
    ckpt = open_checkpoint(folder)
    path = write_gguf(tmp_path / "q.gguf", ckpt.load_state(), ckpt.args, orig, "f32")
    meta = fields(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and meta["tokenizer.ggml.add_bos_token"] is False
    ours = Llama.build(path, max_seq_len=32, max_batch_size=1, dtype="fp32", device="cpu").tokenizer
    texts = TEXTS + ["numbers 2024 split 1 by 1", "it's\r\n\n  x", "IT'S CAPS'LL"]
    for s in texts:
        assert ours.encode(s, bos=False, eos=False) == tk.encode(s, add_special_tokens=False).ids, s
        assert ours.decode(tk.encode(s, add_special_tokens=False).ids) == s
    if HAVE_LLAMA_CPP:  # llama.cpp's "qwen2" pre-tokenizer and BPE on the vocabulary nabla wrote
        assert llama_cpp_tokens(path, texts) == [tk.encode(s, add_special_tokens=False).ids for s in texts]
    assert ours.eos_id == 2 and 2 in ours.stop_ids
    # GGUF -> GGUF keeps the vocabulary as it is
    from nabla.checkpoint.convert import convert_checkpoint

    (again,) = convert_checkpoint(path, tmp_path / "again", "gguf")
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")
    assert {k: fields(again)[k] for k in keys} == {k: meta[k] for k in keys}


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("qwen2"), "qwen2", vocab_size=VOCAB)[1]


def test_unknown_and_unrun_architectures(tmp_path):
    for arch, says in [("mamba", "'mamba'.*runs the GGUF architectures llama, qwen2"),
                       ("gemma3", "'gemma3'.*does not implement its per-layer-type rotary")]:
        w = gguf.GGUFWriter(tmp_path / f"{arch}.gguf", arch)
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ConfigError, match=f"{arch}.gguf.*{says}"):
            open_checkpoint(tmp_path / f"{arch}.gguf")


def test_missing_key_and_refused_keys(tmp_path, qwen2):
    K = gguf.Keys
    path = converter_gguf(tmp_path / "nokey.gguf", qwen2, "qwen2", drop=(K.LLM.FEED_FORWARD_LENGTH,))
    with pytest.raises(CheckpointError, match="nokey.gguf has no qwen2.feed_forward_length.*convert"):
        open_checkpoint(path)
    for key, value, says in [(K.LLM.EXPERT_COUNT, 8, "mixture-of-experts"),
                             (K.Attention.SCALE, 0.5, "fixed attention scale"),
                             (K.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0, "soft-capping.*gemma2 only"),
                             (K.Rope.DIMENSION_COUNT, 8, "rotates 8 of each head's 16 channels")]:
        path = converter_gguf(tmp_path / "bad.gguf", qwen2, "qwen2", extra={key: value})
        with pytest.raises(ConfigError, match=f"bad.gguf.*{says}"):
            open_checkpoint(path)
    path = converter_gguf(tmp_path / "yarn.gguf", qwen2, "qwen2")
    r = fields(path)
    assert "qwen2.rope.scaling.type" not in r


def test_yarn_file_is_refused_naming_the_key(tmp_path, qwen2):
    from nabla.checkpoint.gguf_families import args_from_metadata

    meta = fields(converter_gguf(tmp_path / "y.gguf", qwen2, "qwen2"))
    meta["qwen2.rope.scaling.type"] = "yarn"
    with pytest.raises(ConfigError, match="y.gguf: qwen2.rope.scaling.type is 'yarn'"):
        args_from_metadata(meta, lambda name: None, False, VOCAB, "y.gguf")


def test_models_llama_cpp_would_compute_differently_are_not_written(tmp_path):
    for family, extra, says in [("gemma2", {}, "attention scale.*query_pre_attn_scalar 20"),
                                ("qwen2-sliding", {}, "sliding window on some layers")]:
        folder, _ = save_family(tmp_path / family, family, **extra)
        ckpt = open_checkpoint(folder)
        with pytest.raises(ConfigError, match=f"'{family.split('-')[0]}' architecture.*{says}"):
            write_gguf(tmp_path / "x.gguf", ckpt.load_state(), ckpt.args, None, "f32")
        assert not (tmp_path / "x.gguf").exists()


def test_convert_and_info_tell_the_architecture(tmp_path):
    from nabla.checkpoint.convert import convert_checkpoint
    from nabla.checkpoint.info import checkpoint_info

    folder, hf = save_family(tmp_path / "qwen3", "qwen3")  # with TinyLlama's tokenizer.json, 32000 ids
    (out,) = convert_checkpoint(folder, tmp_path / "out", "gguf")
    info = checkpoint_info(out)
    assert info["gguf"]["architecture"] == "qwen3" and info["architecture"]["model_type"] == "qwen3"
    assert info["context_length"] == hf.config.max_position_embeddings
    llama = Llama.build(out, max_seq_len=32, max_batch_size=1, dtype="fp32", device="cpu")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        torch.testing.assert_close(llama.model(torch.tensor([PROMPT]))[0], want, atol=1e-4, rtol=0)
    orig = load_tokenizer(folder / "tokenizer.json")
    for s in TEXTS:
        assert llama.tokenizer.encode(s, bos=True, eos=False) == orig.encode(s, bos=True, eos=False), s


def test_q4_0_blocks_kept_equal_the_requantized_floats(case, tmp_path):
    """A family's Q4_0 file loads its blocks as they are, q/k rows reordered and Phi-3's fused rows split
    as the float path does them: the int4 layers equal the dequantized weights quantized again (exact,
    Q4_0 of Q4_0 values is the same blocks)."""
    from nabla.checkpoint.gguf_quantized import quantized_state
    from nabla.checkpoint.meta import load_into
    from nabla.model.quantize import Int4Linear, quantize_model

    name, folder, hf, want = case
    path = write_nabla(tmp_path / "m.gguf", folder, "q4_0")
    ckpt = open_checkpoint(path)
    assert ckpt.load_quantize == "int4"
    state, args, q = quantized_state(ckpt)
    with torch.device("meta"):
        kept = Transformer(args)
    quantize_model(kept, q["mode"], device=torch.device("cpu"), head=q["head"])
    kept = kept.to_empty(device="cpu")
    load_into(kept, state)
    floats = Transformer(ckpt.args)
    floats.load_state_dict(dict(ckpt.load_state()), strict=False)
    quantize_model(floats, "int4", head=q["head"])
    n = 0
    for (key, a), b in zip(kept.named_modules(), floats.modules()):
        if isinstance(a, Int4Linear):
            assert isinstance(b, Int4Linear), key
            # (values, not bits: a zero block's d may be +0 in the file and -0 requantized)
            assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales), key
            n += 1
    assert n >= 7 * args.n_layers
