"""GGUF in (nabla.checkpoint.gguf_read, nabla.tokenizer.gguf): tensors equal the gguf package's
dequantization, a tiny model round-trips nabla -> GGUF -> nabla, tokenizers read from metadata
encode like their original files, and bad files are one clear error."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER, TINY_GQA, random_state  # noqa: E402

from nabla import Llama  # noqa: E402
from nabla.checkpoint import open_checkpoint  # noqa: E402
from nabla.checkpoint.gguf import write_gguf  # noqa: E402
from nabla.checkpoint.gguf_read import LOADS_AS  # noqa: E402
from nabla.checkpoint.meta import args_from_params  # noqa: E402
from nabla.errors import CheckpointError, ConfigError, TokenizerError  # noqa: E402
from nabla.tokenizer import load_tokenizer  # noqa: E402
from nabla.tokenizer.gguf import gguf_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
PARAMS = dict(TINY_GQA)
PROMPT = [1, 15043, 3186, 29892, 920, 526]
TEXTS = ["Hello world, how are you?", "  spaces   and\nnewlines\t", "émoji 🦙 中文 1234567", "<s> [INST] hi"]


def tiny():
    args = args_from_params(dict(PARAMS))
    return args, random_state(args, 3)


def meta_folder(tmp_path, state, args, name="meta"):
    """A Meta folder holding `state` (e.g. the weights a GGUF file dequantizes to)."""
    from conftest import write_meta_checkpoint

    return write_meta_checkpoint(tmp_path / name, args.to_params(), state, None)


def logits(llama, prompt=PROMPT):
    with torch.no_grad():
        return llama.model(torch.tensor([prompt]))[0]


# ------------------------------------------------------------------ dequantization
def one_tensor_file(path, data, qtype):
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.attn_q.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_blocks(qtype, rows, seed=0):
    """Random blocks of a type gguf's quantizer lacks (k-quants), with finite f16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, nbytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # ql, qh, scales (int8), then d
        raw[:, -2:] = scales[:, :2]
    else:  # d, dmin first
        raw[:, :4] = scales
    return raw, block


@pytest.mark.parametrize("name", list(LOADS_AS))
def test_dequantization_equals_gguf_package(tmp_path, name):
    from nabla.checkpoint.gguf_read import _reader, _tensor

    qtype = Q[name]
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf.quants has no quantizer for k-quants: random raw blocks
        data, _ = raw_blocks(qtype, 4)
    elif qtype == Q.F32:
        data = x
    elif qtype == Q.F16:
        data = x.astype(np.float16)
    else:
        data = gguf.quants.quantize(x, qtype)
    path = one_tensor_file(tmp_path / "t.gguf", data, qtype)
    t = _reader(path).tensors[0]
    ours = _tensor(t, path).float().numpy()
    theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape == (4, 256) and np.isfinite(ours).all()


# ------------------------------------------------------------------ model round trip
def test_names_args_and_f32_logits(tmp_path):
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.load_quantize is None and ckpt.dtype == torch.float32
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps", "rope_theta"):
        assert getattr(ckpt.args, k) == pytest.approx(getattr(args, k)), k
    got = ckpt.load_state()
    assert set(got) == {k for k in state if k != "rope.freqs"}
    for k in got:
        assert torch.equal(got[k], state[k]), k  # f32: the very weights (attn_q/attn_k rows unpermuted)
    a = Llama.build(path, max_seq_len=32, max_batch_size=1)
    b = Llama.build(meta_folder(tmp_path, state, args), LLAMA2_TOKENIZER, max_seq_len=32, max_batch_size=1)
    torch.testing.assert_close(logits(a), logits(b), atol=1e-5, rtol=0)
    # a folder holding the one file opens too
    assert open_checkpoint(tmp_path).path == path


@pytest.mark.parametrize("qtype,mode", [("f16", None), ("q8_0", "int8"), ("q4_0", "int4")])
def test_block_formats_give_the_dequantized_weights_logits(tmp_path, qtype, mode):
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), qtype)
    ckpt = open_checkpoint(path)
    assert ckpt.load_quantize == mode
    deq = {k: v.float() for k, v in ckpt.load_state().items()}
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(deq["layers.1.feed_forward.w2.weight"].shape)
    np.testing.assert_array_equal(deq["layers.1.feed_forward.w2.weight"].numpy(), want)
    a = Llama.build(path, max_seq_len=32, max_batch_size=1)
    b = Llama.build(meta_folder(tmp_path, deq, args), LLAMA2_TOKENIZER, max_seq_len=32, max_batch_size=1,
                    quantize=mode)
    torch.testing.assert_close(logits(a), logits(b), atol=1e-5, rtol=0)


def test_generate_equals_original_folder(tmp_path, make_checkpoint):
    folder = make_checkpoint(PARAMS, seed=3)
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    kw = dict(max_seq_len=32, max_batch_size=1)
    a, b = Llama.build(path, **kw), Llama.build(folder, **kw)
    prompt = [b.tokenizer.encode("Once upon a time", bos=True, eos=False)]
    assert a.tokenizer.encode("Once upon a time", bos=True, eos=False) == prompt[0]
    ta, _ = a.generate(prompt, max_gen_len=12, temperature=0.0)
    tb, _ = b.generate(prompt, max_gen_len=12, temperature=0.0)
    assert ta == tb


def test_convert_gguf_to_meta_and_hf(tmp_path):
    from nabla.checkpoint.convert import convert_checkpoint

    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "q8_0")
    want = logits(Llama.build(path, max_seq_len=32, max_batch_size=1, quantize="int8"))
    for to in ("meta", "hf"):
        convert_checkpoint(path, tmp_path / to, to)
        got = Llama.build(tmp_path / to, max_seq_len=32, max_batch_size=1, quantize="int8")
        torch.testing.assert_close(logits(got), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ tokenizers
def test_sentencepiece_vocabulary_encodes_like_its_file(tmp_path):
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    ours, orig = open_checkpoint(path).tokenizer(), load_tokenizer(LLAMA2_TOKENIZER)
    assert (ours.bos_id, ours.eos_id, ours.n_words, ours.stop_ids) == (1, 2, 32000, (2,))
    for s in TEXTS:
        assert ours.encode(s, bos=True, eos=False) == orig.encode(s, bos=True, eos=False), s
        ids = orig.encode(s, bos=True, eos=True)
        assert ours.decode(ids) == orig.decode(ids)


def _llama3_metadata():
    """Llama 3's tiktoken vocabulary as llama.cpp stores it: byte-level strings and merges."""
    from tiktoken.load import load_tiktoken_bpe

    from nabla.tokenizer.tiktoken import LLAMA3_SPECIAL

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    rest = [b for b in range(256) if b not in bs]  # GPT-2's bytes_to_unicode
    table = dict(zip(bs + rest, map(chr, bs + [256 + n for n in range(len(rest))])))

    def text(b):
        return "".join(table[c] for c in b)

    tokens = [text(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    merges = []  # every split of a token into two tokens, by the token's rank (as transformers converts tiktoken)
    for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        pairs = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    n = len(tokens)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": tokens + LLAMA3_SPECIAL,
            "tokenizer.ggml.token_type": [1] * n + [3] * len(LLAMA3_SPECIAL),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": n,
            "tokenizer.ggml.eos_token_id": n + 1, "tokenizer.ggml.eot_token_id": n + 9}


def test_bpe_vocabulary_encodes_like_tiktoken():
    orig = load_tokenizer(LLAMA3_TOKENIZER)
    ours = gguf_tokenizer(_llama3_metadata(), "llama3.gguf")
    assert ours.stop_ids == orig.stop_ids and ours.bos_id == orig.bos_id and ours.n_words == orig.n_words
    for s in TEXTS + ["<|eot_id|> is text here", "don't  stop\n\n\nbelieving 2024!!"]:
        assert ours.encode(s, bos=True, eos=False) == orig.encode(s, bos=True, eos=False), s
        assert ours.decode(orig.encode(s, bos=False, eos=False)) == s
    dialog = [{"role": "user", "content": "Hi there"}]
    from nabla.tokenizer.chat import chat_format_for

    assert chat_format_for(ours).encode_dialog(dialog) == chat_format_for(orig).encode_dialog(dialog)


def test_chat_template_and_stops_from_metadata(tmp_path):
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    meta = dict(open_checkpoint(path).metadata)
    meta["tokenizer.chat_template"] = "{% for m in messages %}{{ bos_token }}[{{ m['content'] }}]{% endfor %}"
    meta["tokenizer.ggml.eot_token_id"] = 5
    tok = gguf_tokenizer(meta, "m.gguf")
    from nabla.tokenizer.chat import chat_format_for

    fmt = chat_format_for(tok)
    assert fmt.name == "template" and tok.stop_ids == (2, 5)
    assert fmt.encode_dialog([{"role": "user", "content": "hi"}]) == [1] + tok.encode("[hi]", False, False)


# ------------------------------------------------------------------ bad input
def test_truncated_file_is_one_clear_error(tmp_path):
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, None, "q8_0")
    data = path.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 2000, 30):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"cut{keep}.gguf.*(truncated|not a GGUF)"):
            open_checkpoint(cut)


def test_unsupported_type_architecture_and_vocabulary(tmp_path):
    raw, _ = raw_blocks(Q.Q2_K, 8)
    path = one_tensor_file(tmp_path / "q2.gguf", raw, Q.Q2_K)
    with pytest.raises(CheckpointError, match="q2.gguf.*Q2_K.*does not read"):
        from nabla.checkpoint.gguf_read import _reader, open_gguf

        _reader(path)
        open_gguf(path)
    data = bytearray(path.read_bytes())  # the same file with a type id no GGUF reader knows
    kind = int(Q.Q2_K).to_bytes(4, "little")
    at = data.rfind(kind, 0, 200)
    data[at:at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "x.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="x.gguf.*unknown tensor type"):
        open_checkpoint(tmp_path / "x.gguf")
    w = gguf.GGUFWriter(tmp_path / "gemma3.gguf", "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="gemma3.gguf.*'gemma3'.*does not implement.*llama, qwen2"):
        open_checkpoint(tmp_path / "gemma3.gguf")
    with pytest.raises(TokenizerError, match="m.gguf.*'bert'"):
        gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    with pytest.raises(TokenizerError, match="m.gguf.*'deepseek-llm'.*pre-tokenizer"):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "deepseek-llm"}, "m.gguf")


def test_folder_with_two_gguf_files(tmp_path):
    args, state = tiny()
    write_gguf(tmp_path / "a.gguf", state, args, None, "f32")
    write_gguf(tmp_path / "b.gguf", state, args, None, "f32")
    with pytest.raises(CheckpointError, match="2 GGUF files.*pass the one"):
        open_checkpoint(tmp_path)


def test_info_reports_tensor_types(tmp_path):
    from nabla.checkpoint.info import checkpoint_info

    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "q8_0")
    info = checkpoint_info(path)
    assert info["format"] == "gguf" and info["gguf"]["load_quantize"] == "int8"
    assert info["gguf"]["tensor_types"] == {"Q8_0": 2 + 7 * args.n_layers, "F32": 1 + 2 * args.n_layers}
    assert "int8 per output channel" in info["gguf"]["loads_as"]["Q8_0"]
    assert info["tokenizer"]["kind"] == "gguf llama" and info["tokenizer"]["n_words"] == 32000


@pytest.mark.parametrize("head", [None, "q4_0"])
def test_q4_0_blocks_are_kept_as_they_are(tmp_path, head):
    from nabla.model.quantize import Int4Linear, Int8Linear, int4_from_q4_0

    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "q4_0", head_qtype=head)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == (Q.Q8_0 if head is None else Q.Q4_0)  # q8_0: the head nabla's int4 runs
    model = Llama.build(path, max_seq_len=32, max_batch_size=1).model
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "output.weight" and head == "q4_0":
            packed, scales = int4_from_q4_0(torch.from_numpy(np.array(t.data)),
                                           (model.output.out_features, model.output.in_features))
            assert isinstance(model.output, Int4Linear) and torch.equal(model.output.weight, packed)
        if t.name.startswith("blk.") and t.tensor_type == Q.Q4_0:
            layer, part = int(t.name.split(".")[1]), t.name.split(".")[2]
            lin = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                   "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                   "ffn_up": "feed_forward.w3"}[part]
            mod = model.get_submodule(f"layers.{layer}.{lin}")
            assert isinstance(mod, Int4Linear)
            shape = tuple(int(n) for n in reversed(t.shape))
            packed, scales = int4_from_q4_0(torch.from_numpy(np.array(t.data)), shape)
            assert torch.equal(mod.weight, packed) and torch.equal(mod.scales.view(torch.int16),
                                                                   scales.view(torch.int16))
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            np.testing.assert_array_equal(mod.dequantize().numpy(), want)
    assert isinstance(model.output, Int8Linear if head is None else Int4Linear)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_info_memory_is_what_the_quantized_model_holds(tmp_path, qtype):
    """`nabla info`'s weight memory for a quantized file is the model Llama.build makes of it, not fp32."""
    from nabla.checkpoint.info import checkpoint_info

    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), qtype)
    model = Llama.build(path, max_seq_len=32, max_batch_size=1).model
    held = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if ".cache." not in n and n != "rope")
    estimate = checkpoint_info(path)["memory"]["weights_bytes"]
    assert abs(estimate - held) <= 0.05 * held, (estimate, held)
    assert estimate < 0.7 * sum(t.numel() * 4 for t in state.values())  # not the fp32 size (16.8 MB here)


@pytest.mark.parametrize("qtype,asked,layers", [("q4_0", "int8", "Int8Linear"), ("q8_0", "int4", "Int4Linear")])
def test_asked_quantization_applies_to_every_layer(tmp_path, qtype, asked, layers):
    """quantize= on a GGUF file puts every linear layer in that width, tensor by tensor as it is read."""
    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), qtype)
    model = Llama.build(path, max_seq_len=32, max_batch_size=1, quantize=asked).model
    kinds = {type(model.get_submodule(f"layers.{i}.{p}")).__name__ for i in range(args.n_layers)
             for p in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                       "feed_forward.w2", "feed_forward.w3")}
    assert kinds == {layers}
    # 4-bit blocks stay 4-bit (with a minimum per block), never requantized to Q4_0's grid
    assert "int4 with a minimum" in LOADS_AS["Q4_K"] and "int4 with a minimum" in LOADS_AS["Q4_1"]


def test_q4_1_blocks_are_kept_as_they_are(tmp_path):
    """A Q4_1 file runs its very blocks: each layer (the head too) dequantizes to the gguf package's
    numbers exactly, and computed from those weights gives the dequantized float model's logits."""
    from nabla.checkpoint.gguf_families import meta_name
    from nabla.model.quantize import Int4Linear

    args, state = tiny()
    path = write_gguf(tmp_path / "m.gguf", state, args, load_tokenizer(LLAMA2_TOKENIZER), "q4_1", head_qtype="q4_1")
    ckpt = open_checkpoint(path)
    assert ckpt.load_quantize == "int4"
    model = Llama.build(path, max_seq_len=32, max_batch_size=1).model
    deq = {k: v.float() for k, v in ckpt.load_state().items()}
    n = 0
    for t in gguf.GGUFReader(path).tensors:
        name = meta_name(t.name)[: -len(".weight")]
        if t.tensor_type == Q.Q4_1 and name != "tok_embeddings":  # the embedding is read as floats
            mod = model.get_submodule(name)
            assert isinstance(mod, Int4Linear) and mod.mins is not None, name
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mod.out_features, mod.in_features)
            np.testing.assert_array_equal(mod.dequantize().numpy(), want)
            n += 1
    assert n == 7 * args.n_layers + 1
    reference = logits(Llama.build(meta_folder(tmp_path, deq, args), LLAMA2_TOKENIZER, max_seq_len=32,
                                   max_batch_size=1))
    fast = logits(SimpleNamespace(model=model))  # the CPU kernels: x in int8 per block, as llama.cpp's
    assert ((fast - reference).norm(dim=-1) / reference.norm(dim=-1)).max() < 0.03
    exact = Llama.build(path, max_seq_len=32, max_batch_size=1)
    for mod in exact.model.modules():
        if isinstance(mod, Int4Linear):
            mod.kernel = "dequant"  # the weights themselves, in float32
    torch.testing.assert_close(logits(exact), reference, atol=1e-5, rtol=0)


def with_q4_k_layers(src, dst, seed=0):
    """A copy of the GGUF file `src` whose 2-D block weights and head, where rows are a multiple of 256
    wide, are random Q4_K super-blocks (the gguf package has no Q4_K quantizer): llama.cpp's layout, with
    d and dmin = 7.5 d that make weights of mean ~0 and std ~0.05, as a trained model's."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 2 and data.shape[1] % 256 == 0 and (t.name.startswith("blk.") or t.name == "output.weight"):
            raw = rng.integers(0, 256, size=(data.shape[0], data.shape[1] // 256, 144), dtype=np.uint8)
            d = rng.uniform(1.5e-4, 2.5e-4, size=raw.shape[:2] + (1,))
            raw[..., :4] = np.concatenate([d, 7.5 * d], axis=-1).astype(np.float16).view(np.uint8)
            w.add_tensor(t.name, raw.reshape(data.shape[0], -1), raw_dtype=Q.Q4_K)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_q4_k_blocks_are_kept_as_they_are(tmp_path):
    """A Q4_K file runs its very super-blocks: each layer (the head too) dequantizes to the gguf
    package's numbers exactly, and computed from those weights gives the dequantized float model's
    logits; the CPU kernels (x in int8 per block, as llama.cpp's) within x's quantization."""
    from nabla.checkpoint.gguf_families import meta_name
    from nabla.checkpoint.info import checkpoint_info
    from nabla.model.quantize import Int4Linear

    args = args_from_params(dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=256,
                                 norm_eps=1e-5))
    f32 = write_gguf(tmp_path / "f32.gguf", random_state(args, 5), args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    path = with_q4_k_layers(f32, tmp_path / "q4_k.gguf")
    ckpt = open_checkpoint(path)
    assert ckpt.load_quantize == "int4" and ckpt.tensor_types["Q4_K"] == 7 * args.n_layers + 1
    assert "Q4_K super-blocks as they are" in checkpoint_info(path)["gguf"]["loads_as"]["Q4_K"]
    model = Llama.build(path, max_seq_len=32, max_batch_size=1).model
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type == Q.Q4_K:
            mod = model.get_submodule(meta_name(t.name)[: -len(".weight")])
            assert isinstance(mod, Int4Linear) and mod.format == "Q4_K", t.name
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mod.out_features, mod.in_features)
            np.testing.assert_array_equal(mod.dequantize().numpy(), want)
    deq = {k: v.float() for k, v in ckpt.load_state().items()}
    reference = logits(Llama.build(meta_folder(tmp_path, deq, args), LLAMA2_TOKENIZER, max_seq_len=32,
                                   max_batch_size=1))
    fast = logits(SimpleNamespace(model=model))
    assert ((fast - reference).norm(dim=-1) / reference.norm(dim=-1)).max() < 0.03
    exact = Llama.build(path, max_seq_len=32, max_batch_size=1)
    for mod in exact.model.modules():
        if isinstance(mod, Int4Linear):
            mod.kernel = "dequant"  # the weights themselves, in float32
    torch.testing.assert_close(logits(exact), reference, atol=1e-4, rtol=1e-5)
