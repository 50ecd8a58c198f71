"""`nabla convert --quantize`: a quantized Meta folder that Llama.build loads back as it is."""

import json

import pytest
import torch
from conftest import TINY_MHA, random_state

from nabla import Llama
from nabla.checkpoint.convert import convert_checkpoint
from nabla.checkpoint.meta import args_from_params
from nabla.cli import main
from nabla.errors import CheckpointError, ConfigError, NablaError
from nabla.model import Transformer
from nabla.model.quantize import Int4Linear, Int8Linear, quantize_model, quantize_state

TIED = dict(TINY_MHA, tie_word_embeddings=True)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_state_equals_quantize_model(mode):
    args = args_from_params(dict(TINY_MHA))
    state = random_state(args, 5)
    model = Transformer(args)
    model.load_state_dict(state, strict=False)
    want = quantize_model(model, mode, kernel="dequant").state_dict()
    got = quantize_state(state, args, mode)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("mode,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
@pytest.mark.parametrize("params", [TINY_MHA, TIED], ids=["untied", "tied"])
def test_saved_quantized_folder_loads_as_quantizing_at_load(tmp_path, make_checkpoint, mode, cls, params):
    src = make_checkpoint(params, seed=6)
    out = tmp_path / "q"
    written = convert_checkpoint(src, out, "meta", quantize=mode)
    assert json.loads((out / "quantization.json").read_text())["mode"] == mode
    assert out / "consolidated.00.pth" in written
    stored = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert stored["layers.0.attention.wq.weight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert stored["output.weight"].dtype == torch.int8 and "output.scales" in stored
    assert stored["tok_embeddings.weight"].dtype == torch.float32  # read a row at a time: kept as it was
    saved = Llama.build(out, None, max_seq_len=32, max_batch_size=1)
    assert isinstance(saved.model.layers[1].feed_forward.w2, cls)
    at_load = Llama.build(src, None, max_seq_len=32, max_batch_size=1, quantize=mode)
    prompt = [[1, 15043, 3186, 29892]]
    a, alp = saved.generate(prompt, max_gen_len=8, temperature=0, logprobs=True)
    b, blp = at_load.generate(prompt, max_gen_len=8, temperature=0, logprobs=True)
    assert a == b
    torch.testing.assert_close(torch.tensor(alp), torch.tensor(blp), atol=1e-5, rtol=1e-5)


def test_cli_and_bad_requests(tmp_path, make_checkpoint, capsys):
    src = make_checkpoint(TINY_MHA, seed=6)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "q"), "--to", "meta",
                 "--quantize", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already quantized to int8"):
        Llama.build(tmp_path / "q", None, max_seq_len=32, max_batch_size=1, quantize="int4")
    with pytest.raises(NablaError, match="already quantized"):
        convert_checkpoint(tmp_path / "q", tmp_path / "again", "meta", quantize="int4")
    with pytest.raises(NablaError, match="--to meta"):
        convert_checkpoint(src, tmp_path / "hf", "hf", quantize="int8")
    (tmp_path / "q" / "quantization.json").write_text('{"mode": "int3"}')
    with pytest.raises(CheckpointError, match="quantization.json"):
        Llama.build(tmp_path / "q", None, max_seq_len=32, max_batch_size=1)
    # converting plainly over a quantized folder leaves no stale quantization.json
    convert_checkpoint(src, tmp_path / "q", "meta", force=True)
    assert not (tmp_path / "q" / "quantization.json").exists()
