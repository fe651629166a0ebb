"""Run-directory ownership: a lock that makes a second run into the same directory refuse,
and the rules for starting or continuing the run a directory already holds."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from fnmatch import fnmatchcase

import pytest
from conftest import REPO, clean_environ, run_cli

from terabrain.config.loader import load_experiment, to_yaml
from terabrain.errors import SharedConfigError
from terabrain.train.run_directory import (
    LOCK_NAME,
    MAY_CHANGE_ON_RESUME,
    claim_run_directory,
)

SMALL = ["train.steps=3", "data.num_patches=4000", "data.holdout_patches=500",
         "data.whitening_fit_samples=4000", "model.hidden=32", "optimizer.max_iter=5",
         "train.progress=false"]


def _config(*overrides: str):
    return load_experiment(None, [*SMALL, *overrides])


def _a_run(run_dir, config, finished: bool):
    """A run directory as `terabrain train` leaves it (the files this module reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    if finished:
        (run_dir / "results.json").write_text(json.dumps({"data": {}, "features": {}}))
    return run_dir


def _refusal(run_dir, config, resuming: bool) -> str:
    with pytest.raises(SharedConfigError) as refused:
        claim_run_directory(run_dir, config, resuming)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_a_new_directory_is_claimed_and_locked(tmp_path):
    claim = claim_run_directory(tmp_path / "run", _config(), resuming=False)
    assert not claim.finished
    assert (tmp_path / "run" / LOCK_NAME).read_text().startswith("pid ")
    # The lock is the kernel's: any other open file description is refused while it is held.
    with open(tmp_path / "run" / LOCK_NAME) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = _refusal(tmp_path / "run", _config(), resuming=False)
        assert "is in use by another run (pid " in message and "choose another --out" in message
        claim.lock.close()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its holder


def test_out_on_a_finished_run_refuses_and_says_what_to_do(tmp_path):
    config = _config()
    run = _a_run(tmp_path / "run", config, finished=True)
    before = (run / "config.yaml").read_text()
    for new in (config, _config("model.hidden=48")):
        message = _refusal(run, new, resuming=False)
        assert "choose another --out" in message
    assert "holds a finished run" in _refusal(run, config, resuming=False)
    assert (run / "config.yaml").read_text() == before


def test_out_on_a_run_of_another_configuration_refuses_naming_the_fields(tmp_path):
    run = _a_run(tmp_path / "run", _config(), finished=False)
    message = _refusal(run, _config("model.hidden=48", "seed=3"), resuming=False)
    assert "holds a run of another configuration (seed, model.hidden differ)" in message
    assert "continue that run with --resume" in message


def test_out_on_an_unfinished_run_of_the_same_configuration_continues_it(tmp_path):
    run = _a_run(tmp_path / "run", _config(), finished=False)
    assert not claim_run_directory(run, _config(), resuming=False).finished


@pytest.mark.parametrize("field", ["optimizer.lr=0.5", "train.steps=9", "parallel.model=2",
                                   "train.log_every=2", "train.checkpoint_every=1"])
def test_resume_may_change_learning_rate_steps_mesh_and_logging(tmp_path, field):
    run = _a_run(tmp_path / "run", _config(), finished=False)
    assert not claim_run_directory(run, _config(field), resuming=True).finished


@pytest.mark.parametrize("field", ["model.hidden=48", "objective.sparsity_weight=0.5",
                                   "data.patch_size=6", "seed=5", "optimizer.history_size=5",
                                   "train.batch_size=100"])
def test_resume_refuses_fields_that_change_what_the_checkpoint_means(tmp_path, field):
    run = _a_run(tmp_path / "run", _config(), finished=False)
    message = _refusal(run, _config(field), resuming=True)
    name = field.split("=")[0]
    assert message.startswith(f"--set {name}: cannot change on resume")
    assert "optimizer.lr, train.steps, parallel.*" in message


def test_resume_of_a_finished_run_with_nothing_changed_has_nothing_to_do(tmp_path):
    run = _a_run(tmp_path / "run", _config(), finished=True)
    assert claim_run_directory(run, _config(), resuming=True).finished


def test_every_field_that_may_change_on_resume_exists():
    """The list names real fields: a renamed field would otherwise silently become refusable."""
    every = set(_all_paths(load_experiment("digits-sae").model_dump(mode="json"), ""))
    for pattern in MAY_CHANGE_ON_RESUME:
        assert any(fnmatchcase(path, pattern) for path in every), pattern


def _all_paths(value, prefix):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _all_paths(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


# --- through the command line, real processes ---------------------------------------------

def _train(*arguments: str) -> list[str]:
    sets = [a for s in SMALL for a in ("--set", s)]
    return [sys.executable, "-m", "terabrain", "train", *sets, *arguments]


@pytest.mark.slow
def test_a_second_run_into_the_same_out_refuses_with_one_line_and_the_first_is_unharmed(tmp_path):
    """The first run trains until the second has been refused, then is pre-empted (SIGUSR1):
    its metrics must hold every step once, and the second must have written nothing."""
    run = tmp_path / "run"
    command = _train("--out", str(run), "--set", "train.steps=100000",
                     "--set", "train.checkpoint_every=0")
    first = subprocess.Popen(command, cwd=REPO, env=clean_environ(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(command, check=False, cwd=REPO, env=clean_environ(), capture_output=True,
                                text=True, timeout=300)
        first.send_signal(signal.SIGUSR1)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2
    expected = (f"terabrain: error: {run} is in use by another run (pid {first.pid} on "
                f"{os.uname().nodename} holds {LOCK_NAME}); wait for it to end, or choose "
                "another --out")
    assert second.stderr.strip().splitlines() == [expected]
    assert first.returncode == 75, first_err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "every step exactly once"


def test_resume_with_a_shape_change_is_one_line_and_exit_code_2(tmp_path):
    run = _a_run(tmp_path / "run", _config(), finished=True)
    before = (run / "config.yaml").read_text()
    result = run_cli("train", "--resume", str(run), "--set", "model.hidden=64")
    assert result.returncode == 2
    expected = ("terabrain: error: --set model.hidden: cannot change on resume (the checkpoint "
                "holds the shapes, objective and data); may change: optimizer.lr, train.steps, "
                "parallel.*, device, train's logging and checkpointing; else use a new --out")
    assert result.stderr.strip().splitlines() == [expected]
    other = run_cli("train", *[a for s in SMALL for a in ("--set", s)], "--set", "seed=4",
                    "--out", str(run))
    assert other.returncode == 2 and "holds a finished run" in other.stderr
    again = run_cli("train", *[a for s in SMALL for a in ("--set", s)], "--out", str(run),
                    "--resume-if-exists", check=True)
    assert again.stdout.strip() == f"terabrain: {run} holds this run, finished; nothing to do"
    assert (run / "config.yaml").read_text() == before
