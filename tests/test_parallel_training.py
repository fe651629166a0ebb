"""Training on several real processes (CPU, gloo): model parallelism, data parallelism and both
on a 2x2 mesh equal the single-process run; sharded checkpoints restart on 4, 2 and 1 ranks;
a rank killed mid-run ends the run on every rank with a message."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SCRIPTS, clean_environ, free_port, run_cli, torchrun

SMALL = [
    "--set", "model.hidden=32", "--set", "data.num_patches=4000", "--set", "data.holdout_patches=500",
    "--set", "data.whitening_fit_samples=4000", "--set", "train.progress=false",
]
ADAM_MINIBATCH = SMALL + [
    "--set", "optimizer.name=adam", "--set", "optimizer.lr=0.01", "--set", "train.batch_size=256",
    "--set", "train.checkpoint_every=2",
]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("nproc, shape", [(2, "1x2"), (2, "2x1"), (4, "2x2")])
def test_sharded_forward_gradients_and_weights_equal_one_process(nproc, shape):
    result = _ok(torchrun(nproc, str(SCRIPTS / "sharded_equivalence.py"), shape))
    for rank in range(nproc):
        assert f"rank {rank}: all cases ok" in result.stdout


def test_default_experiment_on_a_2x2_mesh_follows_the_single_process_loss_curve(tmp_path):
    """The issue's command line: torchrun, 4 ranks, 2-way model x 2-way data, L-BFGS."""
    steps = ["--set", "train.steps=3", "--set", "optimizer.max_iter=10"]
    _ok(run_cli("train", "--out", str(tmp_path / "one"), *SMALL, *steps))
    result = _ok(torchrun(4, "-m", "terabrain", "train", "--out", str(tmp_path / "mesh"), *SMALL,
                          *steps, "--set", "parallel.model=2", "--set", "parallel.data=2"))
    assert "on 4 ranks (torchrun)" in result.stdout
    one, mesh = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
    assert len(one) == len(mesh) == 3
    assert mesh == pytest.approx(one, rel=1e-4)
    for name, value in _weights(tmp_path / "one").items():
        assert torch.allclose(_weights(tmp_path / "mesh")[name], value, atol=1e-2), name
    # Each rank's peak resident memory is gathered into results.json (torch alone is >100 MB).
    for run, ranks in (("one", 1), ("mesh", 4)):
        peaks = json.loads((tmp_path / run / "results.json").read_text())["memory"]
        assert len(peaks["peak_resident_bytes"]) == ranks
        assert all(100e6 < peak < 20e9 for peak in peaks["peak_resident_bytes"])
        assert "peak_device_bytes" not in peaks  # a CPU run has no device peak
    assert "peak memory per rank: resident " in result.stdout


def test_restart_on_4_then_2_then_1_ranks_continues_exactly(tmp_path):
    """A checkpoint written by 4 ranks (2x2) resumes on 2 (model-parallel), whose checkpoint
    resumes on 1: the weights equal a run that never stopped, to float tolerance."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    _ok(run_cli("train", "--out", str(reference), *ADAM_MINIBATCH, "--set", "train.steps=6"))
    _ok(torchrun(4, "-m", "terabrain", "train", "--out", str(run), *ADAM_MINIBATCH,
                 "--set", "train.steps=2", "--set", "parallel.model=2", "--set", "parallel.data=2"))
    (run / "results.json").unlink()  # as if stopped before the stage finished
    resumed = _ok(torchrun(2, "-m", "terabrain", "train", "--resume", str(run), "--set", "train.steps=4",
                           "--set", "parallel.model=2", "--set", "parallel.data=1"))
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    (run / "results.json").unlink()
    resumed = _ok(run_cli("train", "--resume", str(run), "--set", "train.steps=6",
                          "--set", "parallel.model=1"))
    assert "(step 4)" in resumed.stdout
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-6)
    expected = _weights(reference)
    for name, value in _weights(run).items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name


def test_batch_that_does_not_split_across_replicas_is_a_config_error():
    result = torchrun(2, "-m", "terabrain", "train", *SMALL, "--set", "train.batch_size=255",
                      "--set", "optimizer.name=adam", "--set", "parallel.data=2")
    assert result.returncode != 0
    assert "train.batch_size (255) must divide evenly among parallel.data = 2" in result.stderr


def test_a_rank_killed_mid_run_stops_the_others_with_a_message(tmp_path):
    """Ranks started by hand (so rank 0's own output is visible); rank 1 is SIGKILLed once
    training is under way; rank 0 must exit with a message well within the timeout."""
    timeout_s = 60
    port = free_port()
    ranks = []
    for rank in range(2):
        environ = {**clean_environ(), "RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, "-m", "terabrain", "train", "--out", str(tmp_path), *ADAM_MINIBATCH,
                   "--set", "train.steps=100000", "--set", "train.checkpoint_every=0",
                   "--set", "parallel.model=2", "--set", f"parallel.timeout_s={timeout_s}"]
        ranks.append(subprocess.Popen(command, env=environ, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert time.monotonic() < deadline, "training never started"
            assert ranks[0].poll() is None, ranks[0].communicate()[0]
            time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)
        output, _ = ranks[0].communicate(timeout=timeout_s + 30)
        elapsed = time.monotonic() - killed_at
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert ranks[0].returncode == 1, output
    # One line, whichever collective (DTensor's, in the forward or backward pass, or the
    # gradient all-reduce) rank 0 was in when its peer died: no traceback before it.
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("terabrain: rank 0 failed:")]
    assert "a peer rank failed or stalled first" in line, line
    assert elapsed < timeout_s + 10


def test_terabrain_launch_runs_data_parallel_training_on_local_processes(tmp_path):
    result = _ok(run_cli("launch", "--nproc", "2", "train", "--out", str(tmp_path), *ADAM_MINIBATCH,
                         "--set", "train.steps=2"))
    assert "on 2 ranks (torchrun)" in result.stdout
    assert len(_losses(tmp_path)) == 2 and (tmp_path / "checkpoints/step_2/.metadata").is_file()
    # One shard file per rank: every rank writes its own part of the checkpoint.
    assert len(list((tmp_path / "checkpoints/step_2").glob("*.distcp"))) == 2


def test_terabrain_launch_exits_with_the_ranks_code_and_their_one_line_messages():
    """No launcher traceback (torchrun's ChildFailedError): the ranks' code, 2 for a
    configuration error, and their own lines."""
    result = run_cli("launch", "--nproc", "2", "train", *SMALL, "--set", "parallel.data=3")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert sorted(result.stderr.strip().splitlines()) == [
        f"terabrain: error: rank {rank}: parallel.data × parallel.model = 3 × 1 = 3 ranks, but "
        "the world size 2 (WORLD_SIZE, set by torchrun): change one of them, or set one to -1"
        for rank in (0, 1)], result.stderr


@pytest.mark.parametrize("nproc", [2, 4])
def test_gradients_reduced_during_the_backward_pass_equal_the_flat_all_reduce(nproc):
    """parallel.overlap: blockwise (tied autoencoder, RICA, L-BFGS) and whole-parameter
    (weight decay through autograd, untied) reductions give the flat exchange's losses and
    weights, bit for bit on 2 ranks; a graph that changes after the first step stops."""
    result = _ok(torchrun(nproc, str(SCRIPTS / "overlap_equivalence.py")))
    for rank in range(nproc):
        assert f"rank {rank}: all cases ok" in result.stdout


@pytest.mark.parametrize("sets", [
    ["model.hidden=256", "parallel.overlap_block_mb=0.5"],  # W reduced in 7 blocks
    ["model.hidden=128", "objective.weight_decay=0.001"],   # decay's second contribution: W whole
], ids=["blocks", "whole"])
def test_the_planner_charges_every_all_reduce_an_overlapped_step_starts(tmp_path, sets):
    """With parallel.overlap a data-parallel step starts one all-reduce per block of the tied
    weight and one per other tensor during the backward pass, and waits for one of the
    logged values after it: on 2 real gloo ranks, counted call by call, the planner's
    (terabrain.capacity.work.gradient_exchange) are the same."""
    result = torchrun(2, str(SCRIPTS / "overlap_calls.py"), str(tmp_path / "run"),
                      "lbann-ae-small", *sets)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for rank in range(2):
        assert f"rank {rank}: ok" in result.stdout, result.stdout + result.stderr[-4000:]
