"""nabla.model.cpu_step (a layer per compiled call) against the torch layers of the same model."""

import copy

import pytest
import torch

pytest.importorskip("numba")

from nabla.model import Transformer, cpu_kernels, cpu_step  # noqa: E402
from nabla.model import cpu_step_jit as sj
from nabla.model.args import ModelArgs  # noqa: E402
from nabla.model.quantize import Int4Linear, pack_int4, quantize_model  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def model(fmt: str, monkeypatch, **switches) -> Transformer:
    wide = dict(dim=256, multiple_of=256) if fmt == "mixed" else dict(dim=64, multiple_of=32)  # Q4_K: 256s
    args = ModelArgs(n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, **wide, **switches)
    m = Transformer(args).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=GEN) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=GEN))
    monkeypatch.setattr(cpu_kernels, "MIN_MODEL_BYTES", 0)
    monkeypatch.setattr(cpu_kernels, "MIN_WEIGHTS", 0)
    if fmt == "fp32":
        assert cpu_kernels.use_row_kernels(m) > 0
    elif fmt == "mixed":  # a GGUF Q4_K_M file's mix: Q4_K, Q4_1, Q4_0 and int8 layers in one group
        quantize_model(m, "int4", kernel="numba", head="int4",
                       int8_layers={"layers.0.attention.wv.weight", "layers.1.feed_forward.w2.weight"})
        int4 = [(name, lin) for name, lin in m.named_modules() if isinstance(lin, Int4Linear)]
        for i, (name, lin) in enumerate(int4):
            if i % 3 == 0:
                parent, _, attr = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, attr, q4_k_layer(lin))
            elif i % 3 == 1:
                lin.mins = (0.02 * torch.randn(lin.scales.shape, generator=GEN)).half()
    else:
        quantize_model(m, fmt, kernel="numba")
    return m


def q4_k_layer(like: Int4Linear) -> Int4Linear:
    """A random layer of `like`'s shape in llama.cpp's Q4_K blocks (6-bit scales and minimums per 32
    weights, fp16 d and dmin per 256)."""
    N, G = like.out_features, like.in_features // 32
    q = torch.randint(0, 16, (N, 32 * G), generator=GEN, dtype=torch.uint8)
    sc, mn = (torch.randint(0, 64, (N, G), generator=GEN, dtype=torch.uint8) for _ in range(2))
    supers = (1e-4 + 4e-4 * torch.rand(N, G // 4, generator=GEN)).half()
    return Int4Linear(None, "numba", bias=like.bias, blocks=(pack_int4(q), sc, mn, supers))


def formats_of(group) -> list[str]:
    """The weight formats a compiled step's product group runs (cpu_step_jit.FORMATS)."""
    return [f for f, fields in zip(sj.FORMATS, group) if fields]


def torch_path(m: Transformer, monkeypatch):
    """A copy of m whose passes never take the compiled step."""
    ref = copy.deepcopy(m)
    real = cpu_step.run
    monkeypatch.setattr(cpu_step, "run", lambda mod, *a: None if mod is ref else real(mod, *a))
    return ref


def steps_taken(monkeypatch) -> list:
    taken = []
    real = cpu_step.CpuStep.__call__

    def spy(self, *a):
        taken.append(a[0].shape)
        return real(self, *a)

    monkeypatch.setattr(cpu_step.CpuStep, "__call__", spy)
    return taken


def close(a, b, fmt, seen=None):
    """a equals b up to float32 rounding. With int8/int4 layers x is quantized per block in both, and a
    rounding difference can move one int8 value of x by one: that position's logits then differ by up
    to ~2% in these 64-wide models, and so do its sequence's later ones (its keys and values differ).
    Each position must stay within 3%, and most (`seen` collects them, see `mostly_exact`) within 1e-5."""
    if fmt == "fp32":
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)
        return
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten().tolist()
    assert max(rel) < 0.03
    if seen is not None:
        seen.extend(rel)


def mostly_exact(seen: list[float]) -> bool:
    return sum(r < 1e-5 for r in seen) >= len(seen) / 2


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "mixed"])
@pytest.mark.parametrize("switches", [
    {}, {"qkv_bias": True}, {"sliding_window": 5},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
], ids=["llama", "qkv-bias", "window", "yarn"])
def test_prefill_and_decode_equal_the_torch_layers(fmt, switches, monkeypatch):
    m = model(fmt, monkeypatch, **switches)
    if switches.get("qkv_bias"):
        with torch.no_grad():
            for layer in m.layers:
                for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=GEN))
    ref = torch_path(m, monkeypatch)
    taken = steps_taken(monkeypatch)
    tokens = torch.randint(0, 300, (2, 14), generator=GEN)
    seen = []
    with torch.inference_mode():
        for x in (m, ref):
            x.setup_cache(3, 32)
        close(m(tokens[:, :6], 0), ref(tokens[:, :6], 0), fmt, seen)  # 12 rows, every position's logits
        close(m(tokens[:, 6:8], 6, last_only=True), ref(tokens[:, 6:8], 6, last_only=True), fmt, seen)
        for p in range(8, 14):
            close(m.decode(tokens[:, p:p + 1], p), ref.decode(tokens[:, p:p + 1], p), fmt, seen)
    assert len(taken) == 8
    assert not seen or mostly_exact(seen), seen
    if fmt == "mixed":  # q (Q4_K), k (Q4_1) and v (int8) of the first layer: one group, three kernels
        assert len(formats_of(m.cpu_step[1].layers[0][4])) == 3


@pytest.mark.parametrize("fmt", ["fp32", "int4", "mixed"])
def test_sequences_at_their_own_positions_and_cache_rows(fmt, monkeypatch):
    """The server's batches: each sequence in its own cache row (`rows`), at its own position."""
    m = model(fmt, monkeypatch, sliding_window=4)
    ref = torch_path(m, monkeypatch)
    taken = steps_taken(monkeypatch)
    prompts = torch.randint(0, 300, (3, 9), generator=GEN)
    seen = []
    with torch.inference_mode():
        for x in (m, ref):
            x.setup_cache(4, 32)
        for slot, n in ((2, 5), (0, 7), (3, 2)):  # prompts of their own lengths into rows 2, 0, 3
            rows, start = torch.tensor([slot]), torch.tensor([0])
            p = prompts[slot % 3:slot % 3 + 1, :n]
            close(m(p, start, rows=rows), ref(p, start, rows=rows), fmt, seen)
        rows, pos = torch.tensor([2, 0, 3]), torch.tensor([5, 7, 2])
        for _ in range(4):
            last = torch.randint(0, 300, (3, 1), generator=GEN)
            close(m(last, pos, rows=rows), ref(last, pos, rows=rows), fmt, seen)
            pos = pos + 1
    assert len(taken) == 7
    assert not seen or mostly_exact(seen), seen


def test_calls_it_does_not_take_run_the_torch_layers(monkeypatch):
    m = model("fp32", monkeypatch)
    ref = torch_path(m, monkeypatch)
    taken = steps_taken(monkeypatch)
    tokens = torch.randint(0, 300, (2, 20), generator=GEN)
    with torch.inference_mode():
        for x in (m, ref):
            x.setup_cache(2, 32)
        close(m(tokens[:, :9], 0), ref(tokens[:, :9], 0), "fp32")  # 18 rows: more than MAX_ROWS
        close(m(tokens[:, :9], None), ref(tokens[:, :9], None), "fp32")  # no cache (scoring)
        with pytest.raises(AssertionError, match="beyond the cache"):  # as the torch layers say
            m(tokens[:, :2], 31)
    assert taken == []
    m = model("fp32", monkeypatch)
    m.setup_cache(2, 32)
    with torch.no_grad():  # outside inference mode, with grad off: still a step
        m(tokens[:, :2], 0)
    assert len(taken) == 1
    m(tokens[:, :2], 0)  # autograd on: torch
    assert len(taken) == 1


@pytest.mark.parametrize("switches", [{"qk_norm": True}, {"post_norms": True}, {"hidden_act": "gelu_tanh"},
                                      {"attn_logit_softcap": 30.0}])
def test_other_families_keep_the_torch_layers(switches, monkeypatch):
    m = model("fp32", monkeypatch, **switches)
    m.setup_cache(1, 8)
    assert cpu_step.CpuStep.for_model(m) is None


def test_a_model_changed_after_its_first_step_is_taken_again(monkeypatch):
    m = model("fp32", monkeypatch)
    ref = torch_path(m, monkeypatch)
    tokens = torch.randint(0, 300, (1, 4), generator=GEN)
    with torch.inference_mode():
        for x in (m, ref):
            x.setup_cache(1, 16)
        m(tokens, 0)
        first = m.cpu_step[1]
        for x in (m, ref):
            quantize_model(x, "int4", kernel="numba")
            x.setup_cache(1, 16)
        close(m(tokens, 0), ref(tokens, 0), "int4")
    groups = [m.cpu_step[1].layers[0][i] for i in (4, 6, 7, 8)]
    assert m.cpu_step[1] is not first and all(formats_of(g) == ["q4"] for g in groups)


def test_a_hook_on_a_layer_keeps_the_torch_layers(monkeypatch):
    m = model("fp32", monkeypatch)
    seen = []
    m.layers[0].register_forward_hook(lambda *a: seen.append(1))
    m.setup_cache(1, 8)
    with torch.inference_mode():
        m(torch.tensor([[1, 2]]), 0)
    assert seen == [1]
