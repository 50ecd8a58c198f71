"""`nabla mnist` end to end, through a parser built with the module's own
`register` and through `nabla.cli.main`."""

import argparse
import gzip
import json

import numpy as np
import pytest

from nabla import cli
from nabla.cli.mnist import register
from nabla.errors import ConfigError
from nabla.network import load
from nabla.network.mnist import DataError


def parse(argv):
    parser = argparse.ArgumentParser(prog="nabla")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def run(argv):
    args = parse(argv)
    return args.func(args)


def test_defaults_are_the_books_first_network():
    args = parse(["mnist"])
    assert (args.sizes, args.epochs, args.batch_size, args.eta) == ("784,30,10", 30, 10, 3.0)
    assert (args.cost, args.lmbda, args.init, args.seed, args.out) == \
        ("quadratic", 0.0, "large", 0, "mnist-network.json")


def test_mnist_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "net.json", tmp_path / "curves.png"
    argv = ["mnist", "--epochs", "2", "--sizes", "784,16,10", "--cost", "cross-entropy", "--lmbda", "0.8",
            "--init", "scaled", "--eta", "0.5", "--out", str(out), "--plot", str(png), "--json"]  # fmt: skip
    assert run(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "Epoch 1: " in captured.err and "/ 2000" in captured.err
    assert result["train_size"] == 8000 and result["test_size"] == 2000
    assert len(result["metrics"]["evaluation_accuracy"]) == 2 and len(result["metrics"]["training_cost"]) == 2
    assert result["accuracy"] > 0.8  # 2 epochs of the improved network
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load(out).sizes == [784, 16, 10]


def test_default_output_in_working_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["mnist", "--epochs", "1", "--sizes", "784,10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("Epoch 0: ") and lines[1].endswith(" / 2000")
    assert load(tmp_path / "mnist-network.json").sizes == [784, 10]


def test_mnist_with_data_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array, code in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 8, code]) + np.array(array.shape, ">u4").tobytes()
            (tmp_path / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    assert run(["mnist", "--data", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "n.json")]) == 0
    out = capsys.readouterr().out
    assert "on 40 images" in out and "holding out 10" in out
    assert any(line.startswith("Epoch 0: ") and line.endswith(" / 10") for line in out.splitlines())


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (["--epochs", "0"], ConfigError, "--epochs must be a positive integer"),
        (["--batch-size", "-1"], ConfigError, "--batch-size must be a positive integer"),
        (["--eta", "0"], ConfigError, "--eta"),
        (["--eta", "nan"], ConfigError, "--eta"),
        (["--lmbda", "-1"], ConfigError, "--lmbda"),
        (["--sizes", "784"], ConfigError, "at least two"),
        (["--sizes", "784,a,10"], ConfigError, "at least two"),
        (["--sizes", "784,0,10"], ConfigError, "positive"),
        (["--sizes", "100,30,10"], ConfigError, "first layer must have 784"),
        (["--sizes", "784,30,9"], ConfigError, "last layer must have 10"),
        (["--out", "/nonexistent-folder/n.json"], ConfigError, "--out"),
        (["--plot", "/nonexistent-folder/p.png"], ConfigError, "--plot"),
        (["--data", "/nonexistent-folder"], DataError, "no such folder"),
    ],
)
def test_bad_flags(flags, error, match, tmp_path):
    with pytest.raises(error, match=match):
        run(["mnist", "--epochs", "1", "--out", str(tmp_path / "n.json"), *flags])


def test_through_nabla_main(tmp_path, monkeypatch, capsys):
    # Only this module's commands, so the test does not depend on the others.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("nabla.cli.mnist",))
    assert cli.main(["mnist", "--epochs", "1", "--sizes", "784,10", "--out", str(tmp_path / "n.json")]) == 0
    assert cli.main(["mnist", "--epochs", "0"]) == 1
    assert "nabla mnist: error: --epochs must be a positive integer, got 0" in capsys.readouterr().err
