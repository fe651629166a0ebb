"""model.safetensors written tensor by tensor (terabrain.train.export): the files read back
with the safetensors library as the model's weights, one file or a sharded set with an
index above the size limit, with the same permissions as every other file of a run; and
streamed from the shards of a model split across 2 real ranks."""

import json

import torch
from conftest import SCRIPTS, torchrun
from safetensors.torch import load_file, save_file

from terabrain.files import ORDINARY_MODE, replace_atomically
from terabrain.nn.autoencoder import RICA, Autoencoder
from terabrain.train.export import export_weights, exported, load_exported


def _expected(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_file_reads_back_as_the_weights_with_ordinary_permissions(tmp_path):
    model = RICA(30, 6, seed=1)
    model.alpha.data.fill_(1.5)  # a 0-d tensor too
    written = export_weights(model, tmp_path)
    assert written == [tmp_path / "model.safetensors"]
    loaded = load_file(str(written[0]))
    for name, value in _expected(model).items():
        assert torch.equal(loaded[name], value), name
    assert written[0].stat().st_mode & 0o777 == ORDINARY_MODE
    assert exported(tmp_path)


def test_above_the_limit_a_sharded_set_with_an_index(tmp_path):
    model = Autoencoder(50, 10, tied=False, seed=2)  # 500 + 10 + 500 + 50 parameters
    written = export_weights(model, tmp_path, shard_parameters=560)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == 4 * 1060
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_exported(tmp_path)
    for name, value in _expected(model).items():
        assert torch.equal(loaded[name], value), name
    for path in written:
        assert path.stat().st_mode & 0o777 == ORDINARY_MODE, path


def test_files_written_by_safetensors_get_the_same_permissions(tmp_path):
    """safetensors creates files 0600; replace_atomically gives every file the same mode."""
    replace_atomically(tmp_path / "w.safetensors",
                       lambda t: save_file({"a": torch.zeros(2)}, str(t)))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == ORDINARY_MODE


def test_streamed_from_two_model_parallel_ranks(tmp_path):
    result = torchrun(2, str(SCRIPTS / "export_ranks.py"), str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}: export ok" in result.stdout
