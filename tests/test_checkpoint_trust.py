"""Checkpoints that are damaged or crafted: the manifest, falling back to the newest checkpoint
that verifies, declared sizes checked before allocation, storage paths kept inside the
checkpoint, guarded safetensors loads; and real write errors during a save."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import hang_fails
from test_checkpoint import _adam_setup, _trainer, nested_state
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from terabrain.errors import ConfigError, TrainingError
from terabrain.tensor_files import load_tensors
from terabrain.train.checkpoint import CheckpointManager, load, read_metadata, restore
from terabrain.train.checkpoint_manifest import MANIFEST, digest, verify
from terabrain.train.checkpoint_reader import CheckpointRefused

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)


class NotATensor:
    """What a tampered checkpoint might hold instead of a tensor."""


@pytest.fixture(autouse=True)
def no_hang():
    with hang_fails(60):
        yield


def _distcp(path: Path) -> Path:
    (found,) = path.glob("*.distcp")
    return found


def _rewrite_manifest(path: Path) -> None:
    """What a tamperer who knows the format does: a manifest that matches the altered files."""
    files = {p.name: dict(zip(("bytes", "sha256"), digest(p)))
             for p in sorted(path.iterdir())
             if p.name != MANIFEST and p.is_file() and not p.is_symlink()}
    (path / MANIFEST).write_text(json.dumps({"format": 1, "files": files}))


# --- the manifest and the fallback --------------------------------------------------------


def test_each_checkpoint_has_a_manifest_of_all_its_files(tmp_path):
    path = CheckpointManager(tmp_path).save(1, nested_state())
    manifest = json.loads((path / MANIFEST).read_text())
    listed = set(manifest["files"])
    assert listed == {p.name for p in path.iterdir()} - {MANIFEST}
    assert ".metadata" in listed and _distcp(path).name in listed
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
    verify(path)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete", "fifo"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    first = _trainer(_adam_setup(), steps=2)
    first.fit()
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(first.step, first.state_dict())
    expected = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.steps = 4
    first.fit()
    newest = manager.save(first.step, first.state_dict())

    data = _distcp(newest)
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete":
        data.unlink()
    else:
        data.unlink()
        os.mkfifo(data)

    chosen, note = manager.restorable()
    assert chosen == tmp_path / "step_2"
    assert "step_4" in note and "resuming from step_2" in note
    assert "\n" not in note and len(note) <= 300

    resumed = _trainer(_adam_setup(), steps=4)
    restore(chosen, resumed)
    assert resumed.step == 2
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_no_checkpoint_verifying_is_one_line(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        path = manager.save(step, nested_state(step))
        os.truncate(_distcp(path), 10)
    with pytest.raises(TrainingError) as raised:
        manager.restorable()
    message = str(raised.value)
    assert "no checkpoint" in message and "step_2" in message and "step_1" in message
    assert "\n" not in message and len(message) <= 300


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "none").restorable() == (None, None)


def test_a_run_resumes_from_the_previous_checkpoint_and_says_so(tmp_path, capsys):
    """The whole path: a run whose newest checkpoint was truncated (the kill came after the
    final checkpoint, before the stage was recorded) resumes from the one before."""
    from terabrain.config.loader import load_experiment
    from terabrain.train.run import run_experiment

    settings = ["data.num_patches=600", "data.holdout_patches=100",
                "data.whitening_fit_samples=600", "model.hidden=8", "train.steps=4",
                "optimizer.max_iter=3", "train.checkpoint_every=2", "train.progress=false"]
    run_dir = tmp_path / "run"
    run_experiment(load_experiment("natural-patches-rica", settings), run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    del results["features"]
    (run_dir / "results.json").write_text(json.dumps(results))
    os.truncate(_distcp(run_dir / "checkpoints" / "step_4"), 100)
    capsys.readouterr()

    run_experiment(load_experiment("natural-patches-rica", settings), run_dir)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "does not verify" in line]
    assert len(lines) == 1 and "step_4" in lines[0] and "resuming from step_2" in lines[0]
    assert "resuming from" in out and "(step 2)" in out
    assert json.loads((run_dir / "results.json").read_text())["features"]["steps"] == 4
    verify(run_dir / "checkpoints" / "step_4")  # written again, whole


# --- crafted metadata ---------------------------------------------------------------------


def _crafted(tmp_path: Path, change) -> Path:
    """A checkpoint whose metadata ``change`` alters, with a manifest that matches."""
    path = CheckpointManager(tmp_path / "checkpoints").save(1, {"a": torch.arange(6.0)})
    metadata = pickle.loads((path / ".metadata").read_bytes())
    change(metadata, path)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(path)
    return path


def test_a_huge_declared_tensor_is_refused_before_allocation(tmp_path):
    def huge(metadata, _):
        entry = metadata.state_dict_metadata["a"]
        entry.size = torch.Size([200_000, 1_000_000])  # 800 GB of float32
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([200_000, 1_000_000]))]
        info = next(iter(metadata.storage_data.values()))
        metadata.storage_data = {MetadataIndex("a", torch.Size([0, 0])): info}

    path = _crafted(tmp_path, huge)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointRefused, match="declares 800000000000 bytes"):
        read_metadata(path)
    with pytest.raises(TrainingError, match="no checkpoint .* verifies .*declares"):
        CheckpointManager(path.parent).restorable()
    with pytest.raises(TrainingError, match="declares"):
        restore(path, _trainer(_adam_setup(), steps=1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_a_chunk_range_beyond_its_file_is_refused(tmp_path):
    def beyond(metadata, _):
        key = next(iter(metadata.storage_data))
        info = metadata.storage_data[key]
        metadata.storage_data[key] = dataclasses.replace(info, length=info.length + 10**9)

    with pytest.raises(CheckpointRefused, match="which holds"):
        read_metadata(_crafted(tmp_path, beyond))


def test_class_from_an_allowed_module_that_is_not_a_metadata_class_is_refused(tmp_path):
    """``filesystem.Tensor`` is a class reachable through DCP's module (torch.Tensor):
    ``Tensor(200000000000)`` would allocate 800 GB."""
    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    crafted = (b"\x80\x04" + short("torch.distributed.checkpoint.filesystem") + short("Tensor")
               + b"\x93" + b"\x8a\x05" + (200_000_000_000).to_bytes(5, "little") + b"\x85R.")
    path = CheckpointManager(tmp_path).save(1, {"a": torch.arange(3.0)})
    (path / ".metadata").write_bytes(crafted)
    with pytest.raises(CheckpointRefused, match="filesystem.Tensor"):
        read_metadata(path)


@pytest.mark.parametrize("target", ["parent", "absolute", "fifo outside", "fifo inside", "dev zero"])
def test_storage_paths_stay_inside_the_checkpoint(tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()

    def escape(metadata, path):
        name = _distcp(path).name
        if target == "parent":
            (outside / name).write_bytes((path / name).read_bytes())
            relative = os.path.relpath(outside / name, path)
        elif target == "absolute":
            relative = str(path / name)
        elif target == "fifo outside":
            os.mkfifo(outside / "pipe.distcp")
            relative = os.path.relpath(outside / "pipe.distcp", path)
        elif target == "fifo inside":
            os.mkfifo(path / "pipe.distcp")
            relative = "pipe.distcp"
        else:
            os.symlink("/dev/zero", path / "zero.distcp")
            relative = "zero.distcp"
        for key, info in metadata.storage_data.items():
            metadata.storage_data[key] = dataclasses.replace(info, relative_path=relative)

    path = _crafted(tmp_path, escape)
    with pytest.raises(CheckpointRefused, match="outside the checkpoint|not a regular file"):
        read_metadata(path)
    with pytest.raises(TrainingError, match="outside the checkpoint|not a regular file"):
        load(path, {"a": torch.empty(6)})


def test_unpickling_errors_never_advise_unsafe_loading(tmp_path):
    """A .distcp whose tensor record holds another object: torch's own message advises
    weights_only=False; ours refuses without that advice."""
    import io

    path = CheckpointManager(tmp_path).save(1, {"a": torch.arange(6.0)})
    data = _distcp(path)
    buffer = io.BytesIO()
    torch.save(NotATensor(), buffer)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = dataclasses.replace(
        metadata.storage_data[key], offset=0, length=len(buffer.getvalue()))
    data.write_bytes(buffer.getvalue() + b"\0" * 64)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(TrainingError) as raised:
        load(path, {"a": torch.empty(6)})
    assert "weights_only" not in str(raised.value)
    assert "refusing" in str(raised.value)


# --- safetensors ----------------------------------------------------------------------------


def _safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


CRAFTED_SAFETENSORS = {
    "huge header length": _safetensors({}, length=2**62),
    "not json": _safetensors(b"{{{{"),
    "deep json": _safetensors(b"[" * 100_000 + b"]" * 100_000),
    "offsets beyond the file": _safetensors(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "shape larger than its bytes": _safetensors(
        {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16),
    "unknown dtype": _safetensors(
        {"w": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "empty file": b"",
}


@pytest.mark.parametrize("kind", list(CRAFTED_SAFETENSORS))
def test_crafted_safetensors_are_one_line(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(CRAFTED_SAFETENSORS[kind])
    with pytest.raises(ConfigError) as raised:
        load_tensors(path, ConfigError)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400
    assert str(path) in str(raised.value)


def test_safetensors_from_a_fifo_or_dev_zero_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    for name in ("pipe.safetensors", "zero.safetensors"):
        with pytest.raises(TrainingError, match="not a regular file"):
            load_tensors(tmp_path / name, TrainingError)


def test_analyze_reports_a_crafted_model_safetensors_in_one_line(tmp_path, capsys):
    """One subprocess, as a user runs it (exit 2, one line, no traceback); the other crafted
    files in this process through the same entry point."""
    from safetensors.torch import save_file

    from terabrain.cli import main
    from terabrain.config.loader import load_experiment, to_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_experiment("natural-patches-rica", ["model.hidden=8"])
    (run_dir / "config.yaml").write_text(to_yaml(config))
    (run_dir / "model.safetensors").write_bytes(CRAFTED_SAFETENSORS["offsets beyond the file"])
    result = _run([sys.executable, "-m", "terabrain", "analyze", str(run_dir), "--concepts",
                   "none"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors is damaged" in lines[0], result.stderr
    for kind in ("huge header length", "deep json", "shape larger than its bytes"):
        (run_dir / "model.safetensors").write_bytes(CRAFTED_SAFETENSORS[kind])
        assert main(["analyze", str(run_dir), "--concepts", "none"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "model.safetensors is damaged" in lines[0], lines
    # Well-formed but with the wrong tensors: also one line (it does not fit config.yaml).
    save_file({"nonsense": torch.zeros(3)}, str(run_dir / "model.safetensors"))
    assert main(["analyze", str(run_dir), "--concepts", "none"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not fit config.yaml" in lines[0], lines


# --- write errors during a save -----------------------------------------------------------

_SAVE_UNDER_A_LIMIT = textwrap.dedent("""
    import resource, signal, sys, warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    sys.path.insert(0, {repo!r})
    import torch
    from terabrain.cli import main
    from terabrain.errors import TrainingError
    from terabrain.train.checkpoint import CheckpointManager

    manager = CheckpointManager({directory!r}, keep=3)
    manager.save(1, {{"w": torch.zeros(100)}})
    # The kernel refuses writes past RLIMIT_FSIZE with EFBIG once SIGXFSZ is ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        manager.save(2, {{"w": torch.zeros(1_000_000)}})
    except TrainingError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
""")


def _assert_failed_save_left_the_previous_checkpoint(directory: Path, result, cause: str):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert cause in lines[0] and str(directory) in lines[0]
    assert "the latest checkpoint is still step_1" in lines[0]
    assert not list(directory.glob(".step_*"))
    assert CheckpointManager(directory).latest() == directory / "step_1"
    assert CheckpointManager(directory).restorable() == (directory / "step_1", None)
    restored = {"w": torch.ones(100)}
    load(directory / "step_1", restored)
    assert torch.equal(restored["w"], torch.zeros(100))


def test_a_file_size_limit_during_a_save_is_one_line_and_keeps_the_previous(tmp_path):
    directory = tmp_path / "checkpoints"
    script = _SAVE_UNDER_A_LIMIT.format(repo=str(REPO), directory=str(directory))
    result = _run([sys.executable, "-c", script])
    _assert_failed_save_left_the_previous_checkpoint(directory, result, "File too large")


def _mount_tiny_tmpfs(where: Path, size: str = "256k") -> bool:
    where.mkdir()
    mounted = _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)])
    return mounted.returncode == 0


def test_a_full_disk_during_a_training_run_exits_1_with_one_line(tmp_path):
    """A real full file system (a 256 KB tmpfs; needs root, skipped otherwise): the run's
    first checkpoints fit, a later one does not."""
    mount = tmp_path / "small"
    if not _mount_tiny_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        directory = mount / "checkpoints"
        script = _SAVE_UNDER_A_LIMIT.format(repo=str(REPO), directory=str(directory)).replace(
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))", "")
        result = _run([sys.executable, "-c", script])
        _assert_failed_save_left_the_previous_checkpoint(
            directory, result, "No space left on device")
    finally:
        _run(["umount", str(mount)])


def test_a_full_disk_under_the_cli_exits_1(tmp_path):
    """`terabrain train --out` on a 2 MB file system: the checkpoint of step 1 (1.2 MB) fits,
    the one of step 2 (2 MB, with the optimizer's history) does not. Exit code 1, one line
    naming the file and the cause, no traceback; step 1 stays the latest and verifies."""
    mount = tmp_path / "small"
    if not _mount_tiny_tmpfs(mount, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        settings = ["data.num_patches=600", "data.holdout_patches=100",
                    "data.whitening_fit_samples=600", "model.hidden=1500", "train.steps=2",
                    "optimizer.max_iter=2", "train.progress=false", "train.checkpoint_every=1"]
        result = _run([sys.executable, "-m", "terabrain", "train", "natural-patches-rica",
                       "--out", str(mount / "run"), *(f"--set={s}" for s in settings)])
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1, result.stderr
        assert "No space left on device" in errors[0] and ".step_2.partial/" in errors[0]
        assert "the latest checkpoint is still step_1" in errors[0]
        checkpoints = mount / "run" / "checkpoints"
        assert not list(checkpoints.glob(".step_*"))
        assert CheckpointManager(checkpoints).restorable() == (checkpoints / "step_1", None)
    finally:
        _run(["umount", str(mount)])


def test_resume_of_a_finished_run_with_a_crafted_export_is_one_line(tmp_path, capsys):
    """`train --resume` of a run whose feature stage is recorded as finished (and whose
    supervised stage is not) loads its model.safetensors: a crafted one is exit code 1 and
    one line, not a traceback."""
    from terabrain.cli import main
    from terabrain.config.loader import load_experiment, to_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = ["model.hidden=8", "train.progress=false", "supervised.train.progress=false"]
    (run_dir / "config.yaml").write_text(to_yaml(load_experiment("digits-sae", settings)))
    (run_dir / "results.json").write_text(json.dumps(
        {"data": {"example_shape": [8, 8]}, "features": {"steps": 1}}))
    for kind in ("shape larger than its bytes", "huge header length"):
        (run_dir / "model.safetensors").write_bytes(CRAFTED_SAFETENSORS[kind])
        code = main(["train", "--resume", str(run_dir)])
        err = capsys.readouterr().err
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "model.safetensors" in lines[0] and "damaged" in lines[0], err
