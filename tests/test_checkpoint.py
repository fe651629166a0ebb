"""Checkpoints: atomic layout, pruning, safe loading, and exact optimizer-state round trips."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from terabrain.errors import TrainingError
from terabrain.config.schema import (
    OptimizerConfig, ReconstructionObjectiveConfig, RICAObjectiveConfig, TrainConfig,
)
from terabrain.learners.autoencoder import AutoencoderModel
from terabrain.learners.rica import RICAModel
from terabrain.learners.registry import build_model
from terabrain.objectives import build_objective
from terabrain.train import callbacks as cb
from terabrain.train.checkpoint import (
    CheckpointManager,
    load,
    read_metadata,
    restore,
    template_from_metadata,
)
from terabrain.train.optim import (
    load_optimizer_state_tensors,
    optimizer_state_tensors,
)
from terabrain.train.stage import build_trainer
from terabrain.train.trainer import Trainer


def nested_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "weight": torch.randn(5, 3, generator=g),
            "bias": torch.randn(3, generator=g, dtype=torch.float64),
            "half": torch.randn(4, generator=g).to(torch.bfloat16),
        },
        "optimizer": {
            "weight/exp_avg": torch.randn(5, 3, generator=g),
            "weight/old_dirs": torch.randn(2, 15, generator=g),
            "weight/n_iter__number": torch.tensor(7),
            "weight/flag__number": torch.tensor(True),
        },
        "trainer": {"step": torch.tensor(3 + seed), "rng": torch.get_rng_state()},
        "callbacks": {"EarlyStopping": {"best": torch.tensor(1.5, dtype=torch.float64)}},
    }


def empty_like(state):
    if isinstance(state, dict):
        return {k: empty_like(v) for k, v in state.items()}
    return torch.zeros_like(state)


def assert_same(a, b, path="state"):
    assert isinstance(b, dict) == isinstance(a, dict), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path


# --- layout -------------------------------------------------------------------------------


def test_round_trip_of_nested_tensor_dicts(tmp_path):
    state = nested_state()
    path = CheckpointManager(tmp_path).save(3, state)
    assert path == tmp_path / "step_3"
    assert (path / ".metadata").is_file()
    restored = empty_like(state)
    load(path, restored)
    assert_same(state, restored)


def test_template_from_metadata_gives_shapes_and_dtypes(tmp_path):
    state = nested_state()
    path = CheckpointManager(tmp_path).save(1, state)
    template = template_from_metadata(path, "optimizer.")
    assert set(template) == set(state["optimizer"])
    for key, tensor in state["optimizer"].items():
        assert template[key].shape == tensor.shape and template[key].dtype == tensor.dtype


def test_latest_ignores_partial_and_incomplete_directories(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    manager.save(1, nested_state(1))
    manager.save(2, nested_state(2))
    # A save killed half way: a complete-looking .partial (even with .metadata) is ignored.
    partial = tmp_path / ".step_3.partial"
    partial.mkdir()
    for item in (tmp_path / "step_2").iterdir():
        (partial / item.name).write_bytes(item.read_bytes())
    # A step directory without metadata (never produced by save) is not complete either.
    (tmp_path / "step_4").mkdir()
    assert manager.latest() == tmp_path / "step_2"

    # The next save clears the leftover and becomes the newest.
    manager.save(3, nested_state(3))
    assert not partial.exists()
    assert manager.latest() == tmp_path / "step_3"
    restored = empty_like(nested_state(3))
    load(manager.latest(), restored)
    assert_same(nested_state(3), restored)


def test_latest_is_the_newest_step_even_if_the_latest_file_lags(tmp_path):
    """A kill between the rename and the update of ``latest`` leaves the file one behind."""
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, nested_state(1))
    manager.save(2, nested_state(2))
    (tmp_path / "latest").write_text("step_1\n")
    assert manager.latest() == tmp_path / "step_2"


def test_pruning_keeps_newest_and_latest_file_names_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        manager.save(step, nested_state(step))
        assert (tmp_path / "latest").read_text() == f"step_{step}\n"
        assert manager.steps() == list(range(max(1, step - 1), step + 1))
    assert manager.latest() == tmp_path / "step_5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_4", "step_5"]

    manager3 = CheckpointManager(tmp_path / "three", keep=3)
    for step in (2, 4, 6, 8, 10):
        manager3.save(step, nested_state(step))
    assert manager3.steps() == [6, 8, 10]


def test_saving_over_an_existing_step_replaces_it(tmp_path):
    """After a resume from an older checkpoint a step can be written again."""
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, nested_state(1))
    manager.save(2, nested_state(2))
    manager.save(2, nested_state(7))
    restored = empty_like(nested_state(7))
    load(tmp_path / "step_2", restored)
    assert_same(nested_state(7), restored)
    assert not list(tmp_path.glob(".step_*"))


# --- safety -------------------------------------------------------------------------------


class _RunsShell:
    """Unpickling this calls os.system: what a tampered checkpoint would try."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _tampered_checkpoint(tmp_path: Path, metadata_bytes: bytes) -> Path:
    manager = CheckpointManager(tmp_path / "checkpoints")
    path = manager.save(1, nested_state())
    (path / ".metadata").write_bytes(metadata_bytes)
    return path


def _stack_global(module: str, name: str) -> bytes:
    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE

    return short(module) + short(name) + b"\x93"  # STACK_GLOBAL


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    call_tail = b"\x8c" + bytes([len(command)]) + command.encode() + b"\x85R."  # TUPLE1 REDUCE STOP
    return {
        "os.system": pickle.dumps(_RunsShell(command)),
        "os.system protocol 0": pickle.dumps(_RunsShell(command), protocol=0),
        # Protocol 4 resolves dotted names: an allowed module's own import reaches os.system.
        "dotted name through an allowed module": b"\x80\x04"
        + _stack_global("torch.distributed.checkpoint.filesystem", "os.system")
        + call_tail,
        "dotted name through torch": b"\x80\x04" + _stack_global("torch", "os.system") + call_tail,
        "builtins.eval": b"\x80\x04"
        + _stack_global("builtins", "eval")
        + b"\x8c" + bytes([len(f"open({str(marker)!r}, 'w')")])
        + f"open({str(marker)!r}, 'w')".encode()
        + b"\x85R.",
    }


@pytest.mark.parametrize("kind", list(_malicious_pickles(Path("x"))))
def test_safe_reader_refuses_metadata_that_calls_arbitrary_code(tmp_path, kind):
    marker = tmp_path / "PWNED"
    path = _tampered_checkpoint(tmp_path, _malicious_pickles(marker)[kind])

    with pytest.raises(pickle.UnpicklingError):
        read_metadata(path)
    assert not marker.exists()

    # DCP wraps the reader's error in CheckpointException (a BaseException, not an Exception).
    with pytest.raises(TrainingError, match="refusing to load"):
        load(path, empty_like(nested_state()))
    assert not marker.exists()

    trainer = _trainer(_lbfgs_setup(), steps=1)
    with pytest.raises(TrainingError, match="refusing to load"):
        restore(path, trainer)
    assert not marker.exists()


def test_safe_reader_refuses_metadata_that_is_not_dcp_metadata(tmp_path):
    path = _tampered_checkpoint(tmp_path, pickle.dumps({"not": "metadata"}))
    with pytest.raises(pickle.UnpicklingError):
        read_metadata(path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_reader_refuses_pickled_byte_entries(tmp_path):
    """The metadata pickle is harmless here; the payload is in a data file it points at."""
    marker = tmp_path / "PWNED"
    path = CheckpointManager(tmp_path / "checkpoints").save(1, {"a": torch.arange(4.0)})
    metadata = pickle.loads((path / ".metadata").read_bytes())
    buffer = io.BytesIO()
    torch.save(_Evil(marker), buffer)
    (path / "evil.distcp").write_bytes(buffer.getvalue())
    info = next(iter(metadata.storage_data.values()))
    metadata.state_dict_metadata["a"] = BytesStorageMetadata()
    metadata.storage_data = {
        MetadataIndex("a"): dataclasses.replace(
            info, relative_path="evil.distcp", offset=0, length=len(buffer.getvalue())
        )
    }
    (path / ".metadata").write_bytes(pickle.dumps(metadata))

    try:
        load(path, {"a": torch.empty(4)})
    except (Exception, CheckpointException):
        pass
    assert not marker.exists(), "loading a tampered checkpoint ran code"


# --- optimizer state ----------------------------------------------------------------------


def _data(rows: int = 64, dim: int = 16) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(1))


def _lbfgs_setup():
    return dict(
        model=RICAModel(hidden=12),
        objective=RICAObjectiveConfig(),
        optimizer=OptimizerConfig(name="lbfgs", max_iter=5, history_size=4),
        batch_size=None,
    )


def _adam_setup():
    return dict(
        model=AutoencoderModel(hidden=12, dropout=0.1),
        objective=ReconstructionObjectiveConfig(),
        optimizer=OptimizerConfig(name="adam", lr=0.01),
        batch_size=16,
    )


def _trainer(setup: dict, steps: int) -> Trainer:
    torch.manual_seed(0)
    x = _data()
    model = build_model(setup["model"], x.shape[1])
    return build_trainer(
        model, build_objective(setup["objective"]), optimizer=setup["optimizer"],
        train=TrainConfig(steps=steps, batch_size=setup["batch_size"]), seed=3, inputs=x,
        callbacks=[cb.EarlyStopping(patience=100, min_delta=0.0)],
    )


SETUPS = {"lbfgs": _lbfgs_setup, "adam": _adam_setup}


@pytest.mark.parametrize("name", list(SETUPS))
def test_optimizer_state_tensors_round_trip_in_memory(name):
    trainer = _trainer(SETUPS[name](), steps=3)
    trainer.fit()
    flat = optimizer_state_tensors(trainer.model, trainer.optimizer)
    assert flat and all(isinstance(v, torch.Tensor) for v in flat.values())
    if name == "lbfgs":
        assert any(key.endswith("old_dirs") for key in flat)

    fresh = _trainer(SETUPS[name](), steps=3)
    load_optimizer_state_tensors(fresh.model, fresh.optimizer, flat)
    assert_same(flat, optimizer_state_tensors(fresh.model, fresh.optimizer))
    original = trainer.optimizer.state_dict()["state"]
    copied = fresh.optimizer.state_dict()["state"]
    assert original.keys() == copied.keys()
    for index in original:
        assert original[index].keys() == copied[index].keys()
        for key, value in original[index].items():
            other = copied[index][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), key
            elif isinstance(value, list):
                assert len(value) == len(other), key
                for a, b in zip(value, other):
                    if a is None or b is None:
                        assert a is None and b is None, key
                    else:
                        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), key
            else:
                assert value == other and type(value) is type(other), key


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("stop_at", [1, 4])
def test_continuing_after_restore_is_bit_identical(tmp_path, name, stop_at):
    steps = 7
    uninterrupted = _trainer(SETUPS[name](), steps=steps)
    uninterrupted.fit()

    first = _trainer(SETUPS[name](), steps=stop_at)
    first.fit()
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(first.step, first.state_dict())
    # Something else uses the global RNG in between (it must be restored too).
    torch.rand(100)

    resumed = _trainer(SETUPS[name](), steps=steps)
    restore(manager.latest(), resumed)
    assert resumed.step == stop_at
    resumed.fit()

    assert resumed.step == uninterrupted.step == steps
    for (key, expected), (_, got) in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().items()
    ):
        assert torch.equal(expected, got), key
    assert_same(
        optimizer_state_tensors(uninterrupted.model, uninterrupted.optimizer),
        optimizer_state_tensors(resumed.model, resumed.optimizer),
    )
    assert resumed.callbacks[0].plateau.best == uninterrupted.callbacks[0].plateau.best
