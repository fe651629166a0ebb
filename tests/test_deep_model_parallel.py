"""Deep networks on a model axis (terabrain.parallel.spatial_network): a split stack equals
one process on real gloo ranks, the CLI run's exported weights equal one process's, and a
checkpoint written on 2 model ranks resumes on 1 process."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SCRIPTS, torchrun
from terabrain.config.loader import load_experiment
from terabrain.config.schema import SupervisedConfig
from terabrain.errors import ConfigError
from terabrain.learners.registry import learner_of

SMALL_DEEP = [
    "data.patch_size=24", "data.num_patches=192", "data.holdout_patches=48",
    "train.batch_size=96", "train.steps=2", "train.log_every=1", "train.checkpoint_every=4",
    "train.keep_checkpoints=5", "model.schedule=greedy", "train.progress=false",
    "model.layers.0.steps=null",
]
SETS = [arg for item in SMALL_DEEP for arg in ("--set", item)]


def test_split_stack_on_1x4_and_2x2_meshes_equals_one_process():
    """On 4 gloo ranks, a 1 x 4 then a 2 x 2 mesh: initial weights, first loss and
    gradients, every training step's loss, final weights and forward copies, a checkpoint
    round trip (next step equal), and the 1 x 4 checkpoint restored on the 2 x 2 mesh."""
    result = torchrun(4, str(SCRIPTS / "deep_spatial_equivalence.py"), "4", "2")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for rank in range(4):
        for mesh in ("model 4 ok", "model 2 ok", "all ok"):
            assert f"rank {rank}: {mesh}" in result.stdout, result.stdout + result.stderr[-4000:]


def test_cli_run_on_2_model_ranks_equals_one_process_and_resumes_on_one(tmp_path, cli):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    cli("train", "yfcc-15b-small", *SETS, "--out", str(one), check=True)
    result = torchrun(2, "-m", "terabrain", "train", "yfcc-15b-small", *SETS,
                      "--set", "parallel.model=2", "--out", str(two))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "on 2 ranks (torchrun)" in result.stdout
    expected = load_file(str(one / "model.safetensors"))
    got = load_file(str(two / "model.safetensors"))
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert (two / "filters.png").stat().st_size > 0

    # The 2-rank run's checkpoint of step 4 (of 6), as if it had stopped there, resumes on
    # one process and ends where the 1-process run ended.
    shutil.copytree(two, resumed)
    (resumed / "results.json").unlink()
    (resumed / "model.safetensors").unlink()
    for later in (resumed / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > 4:
            shutil.rmtree(later)
    assert (resumed / "checkpoints" / "step_4" / ".metadata").is_file()
    output = cli("train", "--resume", str(resumed), "--set", "parallel.model=1", check=True)
    assert "(step 4)" in output.stdout
    got = load_file(str(resumed / "model.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


class _ModelAxis:  # what check_parallel reads of a Parallelism with a model axis of 2
    model_ranks = 2


def _check_model_axis_supported(config):
    learner_of(config).check_parallel(config, _ModelAxis())


def test_the_planner_charges_every_collective_a_split_step_makes(tmp_path):
    """Each collective of a split deep network's step is a point where the ranks wait for
    each other, and the planner charges each call (Link.sync_s): on 2 real gloo ranks, the
    calls of one pipelined step with every layer training, counted by kind, equal the
    planner's (terabrain.learners.deep_work)."""
    result = torchrun(2, str(SCRIPTS / "deep_split_collectives.py"), str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for rank in range(2):
        assert f"rank {rank}: ok" in result.stdout, result.stdout + result.stderr[-4000:]


def test_unsupported_settings_on_a_model_axis_are_config_errors():
    config = load_experiment("yfcc-15b-small", ["optimizer.name=lbfgs"])
    with pytest.raises(ConfigError, match="optimizer.name: lbfgs is not supported"):
        _check_model_axis_supported(config)
    config = load_experiment("yfcc-15b-small").model_copy(update={"supervised": SupervisedConfig()})
    with pytest.raises(ConfigError, match="supervised: not supported"):
        _check_model_axis_supported(config)
