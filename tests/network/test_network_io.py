"""Saving and loading a network as JSON."""

import json

import numpy as np
import pytest

import nabla.network.network as network_module
from nabla.errors import CheckpointError
from nabla.network import CrossEntropyCost, Network, load


def test_save_load_round_trip(tmp_path):
    net = Network([6, 5, 4, 3], cost="cross-entropy", init="scaled", seed=3)
    path = tmp_path / "net.json"
    net.save(path)
    loaded = load(path)
    assert loaded.sizes == [6, 5, 4, 3] and loaded.cost is CrossEntropyCost
    for a, b in zip(net.weights + net.biases, loaded.weights + loaded.biases):
        np.testing.assert_array_equal(a, b)  # JSON keeps every bit of a float64
    x = np.random.default_rng(0).random((6, 4))
    np.testing.assert_array_equal(net.feedforward(x), loaded.feedforward(x))
    assert [p.name for p in tmp_path.iterdir()] == ["net.json"]  # no temporary file left


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "net.json"
    Network([3, 2], seed=0).save(path)
    before = path.read_bytes()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(network_module.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        Network([3, 2], seed=1).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.json"]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="cannot write"):
        Network([3, 2]).save(tmp_path / "no" / "net.json")


def test_loads_the_books_network2_files(tmp_path):
    net = Network([3, 2], seed=0)
    book = {
        "sizes": [3, 2],
        "weights": [w.tolist() for w in net.weights],
        "biases": [b.tolist() for b in net.biases],
        "cost": "CrossEntropyCost",  # network2.py writes the class name
    }
    (tmp_path / "book.json").write_text(json.dumps(book))
    assert load(tmp_path / "book.json").cost is CrossEntropyCost


def test_bad_network_files(tmp_path):
    good = tmp_path / "good.json"
    Network([4, 3, 2], seed=0).save(good)
    data = json.loads(good.read_text())
    cases = {
        "truncated": (good.read_text()[:100], "not a JSON network file"),
        "list": ("[1, 2]", "needs the keys"),
        "shapes": (json.dumps({**data, "sizes": [4, 5, 2]}), "do not fit sizes"),
        "sizes": (json.dumps({**data, "sizes": [4]}), "sizes must list"),
        "cost": (json.dumps({**data, "cost": "hinge"}), "unknown cost"),
        "ragged": (json.dumps({**data, "weights": [[[1.0], [1.0, 2.0]], []]}), "not numeric matrices"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(CheckpointError, match=match):
            load(tmp_path / name)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="not a JSON network file"):
        load(tmp_path / "binary")
    with pytest.raises(CheckpointError, match="no network file"):
        load(tmp_path / "missing.json")
