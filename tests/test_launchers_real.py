"""Two ranks on one host under the real launchers: srun (a one-node SLURM cluster started by
.ci/start-slurm.sh: munged, slurmctld and slurmd), Open MPI's mpirun and MPICH's mpirun
(Hydra). First, the launcher layout: each rank runs ``parallel_scripts/launcher_layout.py``:
``detect_launch_env`` must give both ranks local world size 2, local ranks 0 and 1 and the
same host, and node-local staging into a shared directory must divide the shards between
them by those values (srun and mpirun set no LOCAL_RANK / LOCAL_WORLD_SIZE, so reading
those would make both ranks local rank 0 of 1 and copy everything).

Then, under each launcher: the sharded-equals-one-process check, a dead rank, and a run
pre-empted by SIGUSR1 that the same command then finishes bit for bit (see below).

Debian: ``apt-get install slurm-wlm munge openmpi-bin libopenmpi-dev mpich`` (``.ci/run``
does so). A test is skipped, saying which, when its launcher's programs are absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SCRIPTS, clean_environ, free_port, torchrun
from PIL import Image
from preemption_runs import (
    MODEL_PARALLEL,
    assert_same_run,
    check_preempted,
    train_arguments,
    wait_for_step,
)

from terabrain.data.catalogs import ShardCatalog
from terabrain.data.pack import pack

LAUNCH_TIMEOUT_S = 120


def _program(*names: str) -> str | None:
    """The first of `names` found on PATH or in the sbin directories (daemons live there)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16 small grey images in 6 shards: enough for each of 2 ranks to copy some."""
    base = tmp_path_factory.mktemp("launchers")
    images = base / "images"
    images.mkdir()
    for index in range(16):
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 40), 8 * index, np.uint8)).save(buffer, "PNG", compress_level=0)
        (images / f"img{index:03d}.png").write_bytes(buffer.getvalue())
    pack(images, base / "shards", shard_bytes=15_000, workers=1, log=lambda *_: None)
    return base / "shards"


def _check_two_ranks_on_one_host(out: Path, shards: Path, launcher: str, result) -> None:
    assert result.returncode == 0, f"{launcher} failed:\n{result.stdout}\n{result.stderr}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert seen["launcher"] == launcher
        assert (seen["rank"], seen["world_size"], seen["group_rank"]) == (rank, 2, rank)
        assert seen["local_world_size"] == 2, seen
        # The stream found the same place by itself (its default is detect_launch_env()).
        assert seen["global_launch"] == seen["shard_affine_launch"] == {
            k: v for k, v in seen.items() if k in seen["global_launch"]}
    assert sorted(seen["local_rank"] for seen in ranks) == [0, 1]
    assert ranks[0]["node"] == ranks[1]["node"] == socket.gethostname()
    every_shard = sorted(t.path.name for t in ShardCatalog(shards).tables)
    for order in ("global", "shard_affine"):
        copied = [seen[f"{order}_copied"] for seen in ranks]
        # Divided between the two ranks of the host: every other shard of the rank's copy list
        # (one rank alone, or both taking themselves for local rank 0 of 1, copy them all).
        assert sorted(len(c) for c in copied) == [len(every_shard) // 2, (len(every_shard) + 1) // 2]
        (staged,) = (out / f"stage-{order}").iterdir()
        assert sorted(p.name for p in staged.glob("*.tar")) == sorted(set(copied[0] + copied[1]))
    # The ranks of one host agree on one copy list (the global batches' reading order, or
    # under the shard-affine order the host's replicas' shards), so the halves are disjoint
    # and together all shards (both replicas are here).
    for order in ("global", "shard_affine"):
        copied = [seen[f"{order}_copied"] for seen in ranks]
        assert not set(copied[0]) & set(copied[1]), order
        assert sorted(copied[0] + copied[1]) == every_shard, order


# --- SLURM --------------------------------------------------------------------------------

SLURM_PROGRAMS = ("srun", "sinfo", "slurmctld", "slurmd", "munged")


START_SLURM = REPO / ".ci" / "start-slurm.sh"


def _node_idle(environ: dict[str, str]) -> bool:
    state = subprocess.run([_program("sinfo"), "-h", "-o", "%t"], env=environ, check=False,
                           capture_output=True, text=True, timeout=10).stdout
    return state.strip() == "idle"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on this host; yields srun's environment (SLURM_CONF).

    The cluster that SLURM_CONF names when it is up (.ci/run starts one with
    .ci/start-slurm.sh), else one of this module's own, started by the same script in a
    temporary directory on free ports and stopped afterwards."""
    programs = {name: _program(name) for name in SLURM_PROGRAMS}
    absent = [name for name, path in programs.items() if path is None]
    if absent:
        pytest.skip(f"SLURM not installed ({', '.join(absent)} not found; Debian: "
                    "apt-get install slurm-wlm munge)")
    if os.environ.get("SLURM_CONF"):
        environ = {**clean_environ(), "SLURM_CONF": os.environ["SLURM_CONF"]}
        if _node_idle(environ):
            yield environ
            return
    if os.geteuid() != 0:
        pytest.skip("the test's SLURM cluster needs root (slurmd starts tasks as their user)")
    base = tmp_path_factory.mktemp("slurm")
    ports = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    started = subprocess.run([str(START_SLURM), str(base)], check=False, capture_output=True,
                             text=True, timeout=120, env={**clean_environ(), **ports})
    assert started.returncode == 0, f"{START_SLURM} failed:\n{started.stderr}"
    try:
        yield {**clean_environ(), "SLURM_CONF": str(base / "slurm.conf")}
    finally:
        subprocess.run([str(START_SLURM), "--stop", str(base)], check=False, timeout=60)


def test_srun_two_tasks_on_one_node(slurm_cluster, shards, tmp_path):
    environ = {**slurm_cluster, "MASTER_PORT": str(free_port())}
    command = [_program("srun"), "--overcommit", "--nodes=1", "--ntasks=2", "--kill-on-bad-exit=1",
               "--time=2", sys.executable, str(SCRIPTS / "launcher_layout.py"), str(shards),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                            cwd=REPO, env=environ)
    _check_two_ranks_on_one_host(tmp_path, shards, "slurm", result)


# --- MPI ----------------------------------------------------------------------------------

def _open_mpi_mpirun() -> str | None:
    found = _program("mpirun.openmpi")
    if found is None and _program("ompi_info") is not None:
        found = _program("mpirun")
    return found


def _mpich_mpirun() -> str | None:
    return _program("mpirun.mpich", "mpiexec.hydra")


def _mpi_environ() -> dict[str, str]:
    return {**clean_environ(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def test_open_mpi_mpirun_two_ranks(shards, tmp_path):
    mpirun = _open_mpi_mpirun()
    if mpirun is None:
        pytest.skip("Open MPI not installed (no mpirun.openmpi; Debian: apt-get install openmpi-bin)")
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    environ = _mpi_environ()
    # -x: exported to every rank (needed on other hosts; on this one they inherit it anyway).
    exported = [a for name in ("MASTER_ADDR", "MASTER_PORT", "PYTHONPATH") if name in environ
                for a in ("-x", name)]
    command = [mpirun, "-np", "2", "--oversubscribe", *as_root, *exported, sys.executable,
               str(SCRIPTS / "launcher_layout.py"), str(shards), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                            cwd=REPO, env=environ)
    _check_two_ranks_on_one_host(tmp_path, shards, "open-mpi", result)


def test_mpich_mpirun_two_ranks(shards, tmp_path):
    mpirun = _mpich_mpirun()
    if mpirun is None:
        pytest.skip("MPICH not installed (no mpirun.mpich / mpiexec.hydra; Debian: apt-get "
                    "install mpich)")
    command = [mpirun, "-np", "2", sys.executable,
               str(SCRIPTS / "launcher_layout.py"), str(shards), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                            cwd=REPO, env=_mpi_environ())
    _check_two_ranks_on_one_host(tmp_path, shards, "pmi", result)


# --- training under the real launchers: equivalence, a dead rank, pre-emption -------------
#
# Each launcher starts 2 ranks of: the sharded-equals-one-process check; a rank that dies
# after the process group formed (its peer must end with one line, long before the timeout);
# and a small model-parallel run that receives SIGUSR1 mid-run (scancel --signal=USR1 for
# srun; for mpirun, the signal sent to mpirun, which forwards it to the ranks), must stop
# with a checkpoint and exit code 75, and, run again with the same command, must finish
# bit for bit like the uninterrupted run (a torchrun run of the same 2-rank layout).


class Launcher:
    """How to start 2 ranks of a python command under one launcher, and signal them."""

    def __init__(self, name: str, prefix: list[str], environ: dict[str, str]):
        self.name = name
        self.prefix = prefix
        self.environ = environ

    def command(self, *arguments: str) -> list[str]:
        return [*self.prefix, sys.executable, *arguments]

    def run(self, *arguments: str, timeout: float = LAUNCH_TIMEOUT_S * 3):
        environ = {**self.environ, "MASTER_PORT": str(free_port())}
        return subprocess.run(self.command(*arguments), check=False, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO, env=environ)

    def start(self, *arguments: str) -> subprocess.Popen:
        environ = {**self.environ, "MASTER_PORT": str(free_port())}
        return subprocess.Popen(self.command(*arguments), cwd=REPO, env=environ, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def signal_ranks(self, process: subprocess.Popen, name: str) -> None:
        """SIGUSR1 to every rank, the way this launcher's users send it."""
        if self.name == "srun":
            job = self.job_name()
            subprocess.run([_program("scancel"), f"--signal={name}", f"--name={job}"],
                           env=self.environ, check=True, timeout=30)
        else:
            process.send_signal(getattr(signal, f"SIG{name}"))

    def job_name(self) -> str:
        return next(a.split("=", 1)[1] for a in self.prefix if a.startswith("--job-name="))


def _srun(environ: dict[str, str], job_name: str) -> Launcher:
    return Launcher("srun", [_program("srun"), "--overcommit", "--nodes=1", "--ntasks=2",
                             "--kill-on-bad-exit=1", "--time=10", f"--job-name={job_name}"],
                    environ)


def _open_mpi() -> Launcher:
    mpirun = _open_mpi_mpirun()
    if mpirun is None:
        pytest.skip("Open MPI not installed (no mpirun.openmpi)")
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    # No MASTER_ADDR: on one host the ranks find rank 0 at 127.0.0.1 by themselves.
    return Launcher("mpirun.openmpi", [mpirun, "-np", "2", "--oversubscribe", *as_root,
                                       "-x", "MASTER_PORT", "-x", "PYTHONPATH"],
                    clean_environ())


def _mpich() -> Launcher:
    mpirun = _mpich_mpirun()
    if mpirun is None:
        pytest.skip("MPICH not installed (no mpirun.mpich / mpiexec.hydra)")
    return Launcher("mpirun.mpich", [mpirun, "-np", "2"], clean_environ())


@pytest.fixture(params=["srun", "mpirun.openmpi", "mpirun.mpich"])
def launcher(request, tmp_path) -> Launcher:
    if request.param == "srun":
        return _srun(request.getfixturevalue("slurm_cluster"), f"terabrain-{tmp_path.name}")
    return _open_mpi() if request.param == "mpirun.openmpi" else _mpich()


@pytest.mark.slow
def test_two_ranks_under_the_launcher_equal_one_process(launcher):
    result = launcher.run(str(SCRIPTS / "sharded_equivalence.py"), "1x2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}: all cases ok" in result.stdout


def test_a_dead_rank_under_the_launcher_ends_the_job_with_one_line(launcher):
    """Rank 1 exits (code 3) right after the process group forms; rank 0, in an all-reduce,
    must stop with one line and no traceback, long before the 60 s collective timeout (a
    launcher may also end it first: then it prints nothing, which is fine too)."""
    start = time.monotonic()
    result = launcher.run(str(SCRIPTS / "peer_failure.py"), "1", "exit", "60")
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "rank 0: joined" in output and "unexpectedly succeeded" not in output, output
    assert "Traceback" not in output, output
    assert len([line for line in output.splitlines() if "rank 0 failed" in line]) <= 1, output
    assert elapsed < 60, f"{elapsed:.0f} s"


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory) -> Path:
    """The small model-parallel run on 2 torchrun ranks, never interrupted."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = torchrun(2, *train_arguments(run, *MODEL_PARALLEL))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_usr1_under_the_launcher_checkpoints_and_the_same_command_finishes_identically(
        launcher, uninterrupted_two_ranks, tmp_path):
    run = tmp_path / "run"
    arguments = train_arguments(run, *MODEL_PARALLEL)
    process = launcher.start(*arguments)
    try:
        seen = wait_for_step(run, 4, process)
        launcher.signal_ranks(process, "USR1")
        _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S * 3)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    check_preempted(run, seen, process.returncode, stderr, "SIGUSR1")
    result = launcher.run(*arguments)  # the requeued job: the same command again
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert_same_run(run, uninterrupted_two_ranks)
