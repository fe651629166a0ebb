"""data.source activations: .npy and safetensors shards of a network's activations, read as
one array (in memory or streamed), with bad shards refused naming the file."""

import json

import numpy as np
import pytest
from conftest import run_cli
from safetensors.numpy import save_file

from terabrain.data.activation_shards import ActivationShards, ShardError


def _shards(root, rows=(1000, 800, 1200), width=16):
    data = np.random.default_rng(0).standard_normal((sum(rows), width)).astype(np.float32)
    root.mkdir(exist_ok=True)
    np.save(root / "a.npy", data[: rows[0]])
    np.save(root / "b.npy", data[rows[0]: rows[0] + rows[1]].astype(np.float16))
    save_file({"acts": data[rows[0] + rows[1]:]}, str(root / "c.safetensors"))
    return data


def test_shards_read_as_one_array_across_file_kinds(tmp_path):
    data = _shards(tmp_path / "s")
    shards = ActivationShards(tmp_path / "s")
    assert shards.shape == data.shape
    expected = data.copy()
    expected[1000:1800] = expected[1000:1800].astype(np.float16)  # stored as float16
    assert np.array_equal(shards.rows(0, len(shards)), expected)
    assert np.array_equal(shards.rows(950, 1850), expected[950:1850])  # spans three shards
    for row in (0, 999, 1000, 1799, 1800, 2999):
        assert np.array_equal(shards[row], expected[row])
    with pytest.raises(IndexError):
        shards[3000]


def test_bad_shards_are_refused_naming_the_file(tmp_path):
    _shards(tmp_path / "s")
    np.save(tmp_path / "s" / "d.npy", np.zeros((5, 7), np.float32))
    with pytest.raises(ShardError, match="d.npy: 7"):
        ActivationShards(tmp_path / "s")
    save_file({"x": np.zeros((2, 3), np.float32), "y": np.zeros((2, 3), np.float32)},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(ShardError, match="data.tensor"):
        ActivationShards(tmp_path / "two.safetensors")


def test_a_width_mismatch_is_a_one_line_config_error(tmp_path):
    _shards(tmp_path / "s")
    np.save(tmp_path / "s" / "d.npy", np.zeros((5, 7), np.float32))
    result = run_cli("train", "--out", str(tmp_path / "run"), *_sae("activations", tmp_path / "s"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "data.path" in result.stderr


def _sae(source, path, stream="true"):
    return ["--set", "model.kind=topk_sae", "--set", "model.hidden=32", "--set", "model.k=3",
            "--set", "objective.kind=reconstruction", "--set", "optimizer.name=adam",
            "--set", f"data.source={source}", "--set", f"data.path={path}",
            "--set", f"data.stream={stream}", "--set", "data.remove_mean=false",
            "--set", "data.whitening=none", "--set", "train.batch_size=100",
            "--set", "train.steps=4", "--set", "train.progress=false",
            "--set", "data.holdout_patches=200"]


def test_streamed_shards_train_exactly_as_the_same_rows_in_one_npy(tmp_path):
    data = _shards(tmp_path / "s")
    data[1000:1800] = data[1000:1800].astype(np.float16)
    np.save(tmp_path / "all.npy", data)
    losses = {}
    for source, path in (("activations", tmp_path / "s"), ("npy", tmp_path / "all.npy")):
        out = tmp_path / source
        result = run_cli("train", "--out", str(out), *_sae(source, path))
        assert result.returncode == 0, result.stderr[-2000:]
        losses[source] = [json.loads(line)["loss"]
                          for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["npy"]) == 4 and losses["activations"] == losses["npy"]
