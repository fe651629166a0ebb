"""Which launcher started this process, and joining its process group.

Every rank needs the same few facts: its rank, the world size, its rank among the processes on
its host, how many processes share its host, which host that is, and where rank 0 listens. torchrun, srun, mpirun
and mpiexec each spell them differently. `detect_launch_env` reads whichever set is present into
one `LaunchEnv`; `init_distributed` joins the process group from it; `fail_fast` turns a failure
in any rank into a one-line message and an exit on every rank, instead of a hang.

    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env)
        ...                      # train
        shutdown_distributed()
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import faulthandler
import gc
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from terabrain.errors import (
    PREEMPTED_EXIT_CODE,
    ConfigError,
    Preempted,
    SharedConfigError,
    TrainingError,
)


def is_main_rank() -> bool:
    """Rank 0, or a run without a process group: the one process that writes the run
    directory's shared files and prints run-wide messages."""
    return not dist.is_initialized() or dist.get_rank() == 0


# torch's own default for MASTER_PORT; used when a launcher names no port.
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"
    # The variable the world size was read from: messages about a mesh that does not fit the
    # world quote it, so the user knows which launcher setting to change.
    world_size_var: str | None = None
    # Which host this process runs on: its host name (socket.gethostname()), the same for every
    # rank on one host and different between hosts, whichever launcher started it. local_rank
    # and local_world_size count the processes of this host; node-local staging groups ranks
    # by it. A host name rather than a node index because Open MPI and MPICH give none
    # (OMPI_COMM_WORLD_NODE_RANK is a rank within the host, not the host's number).
    node: str = field(default_factory=socket.gethostname)

    def describe_world(self) -> str:
        """'world size 4 (WORLD_SIZE, set by torchrun)', for error messages."""
        if self.world_size_var is None:
            return f"world size {self.world_size} (no launcher detected: a single process)"
        return f"world size {self.world_size} ({self.world_size_var}, set by {self.launcher})"


def detect_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read rank, world size and rendezvous address from the launcher's variables.

    Launchers are tried in this order, each recognized by its rank or size variable:
    torchrun (RANK, WORLD_SIZE; also any hand-made launch that sets them, as in PyTorch's
    env:// documentation), SLURM's srun (SLURM_PROCID), Open MPI (OMPI_COMM_WORLD_*), and
    MPICH / Intel MPI / other PMI launchers (PMI_RANK, PMI_SIZE). torchrun comes first because
    it is often itself started by srun or mpirun, and then its variables describe the workers.
    With none of these variables the process runs alone (world size 1, launcher "none").
    Every launcher's local rank and local world size count the processes on this host, whose
    name is `node`.
    Under SLURM, start every rank with srun: a python run directly in a batch or salloc shell
    may see SLURM_PROCID=0 with the allocation's SLURM_NTASKS, and would then wait for ranks
    that never start, failing after init_distributed's timeout.

    Raises ConfigError, naming the variables, when a launcher is recognized but a variable it
    must set is missing or not an integer, when the rank is not below the world size, or when
    several processes are launched but nothing says where rank 0 listens (MASTER_ADDR).
    """
    for trigger_vars, read in _LAUNCHERS:
        if any(name in environ for name in trigger_vars):
            env = read(environ)
            _check_ranks(env)
            return env
    return LaunchEnv()


def _from_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    rank, world_size = _require_ints(environ, "torchrun", "RANK", "WORLD_SIZE")
    # torchrun always sets the LOCAL_ variables; a hand-made launch that sets only RANK and
    # WORLD_SIZE runs all its processes on one host, which is what these defaults say.
    local_rank = _optional_int(environ, "torchrun", "LOCAL_RANK", default=rank)
    local_world_size = _optional_int(environ, "torchrun", "LOCAL_WORLD_SIZE", default=world_size)
    return _with_master(environ, LaunchEnv(
        rank, world_size, local_rank, local_world_size, launcher="torchrun",
        world_size_var="WORLD_SIZE"), derived_addr=None)


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    rank, world_size, local_rank = _require_ints(
        environ, "slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    if "SLURM_NTASKS_PER_NODE" in environ:
        (local_world_size,) = _require_ints(environ, "slurm", "SLURM_NTASKS_PER_NODE")
    elif "SLURM_TASKS_PER_NODE" in environ:
        node = _optional_int(environ, "slurm", "SLURM_NODEID", default=0)
        local_world_size = tasks_on_node(environ["SLURM_TASKS_PER_NODE"], node)
    else:
        raise ConfigError("slurm launch detected (SLURM_PROCID is set) but neither "
                          "SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set")
    env = LaunchEnv(rank, world_size, local_rank, local_world_size, launcher="slurm",
                    world_size_var="SLURM_NTASKS")
    return _with_master(environ, env, derived_addr=_slurm_master_addr(environ),
                        derived_port=_slurm_default_port(environ))


def _slurm_master_addr(environ: Mapping[str, str]) -> str | None:
    # srun places rank 0 on the first node of the step, so that node hosts the rendezvous.
    # SLURM_LAUNCH_NODE_IPADDR is the host srun ran on: the first node inside a batch script,
    # but a login node when srun is typed there, so it is only the last resort.
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return first_host(environ[name], name)
    return environ.get("SLURM_LAUNCH_NODE_IPADDR") or None


def _slurm_default_port(environ: Mapping[str, str]) -> int:
    # Two jobs sharing a node must not both listen on 29500. A port derived from the job ID
    # differs between jobs and is the same on every rank of one job. 15000-24999 stays below
    # Linux's ephemeral port range (32768 and up), where the OS hands out client ports.
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or ""
    return 15000 + int(job_id) % 10000 if job_id.isdigit() else DEFAULT_MASTER_PORT


# One host expression of a SLURM node list: name parts and bracketed lists of numbers and
# ranges, e.g. 'rack[1-2]-n[05,07-09]'.
_HOST_EXPRESSION = re.compile(r"(?:[^\s,\[\]]+|\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\])+")


def first_host(nodelist: str, variable: str = "nodelist") -> str:
    """The first host of a SLURM node list in its compressed form.

    'node[01-03,07],gpu5' -> 'node01'; 'rack[1-2]-n[5-6]' -> 'rack1-n5'. Commas separate
    hosts outside brackets; inside, they separate numbers and ranges (zero padding is kept).
    """
    text = nodelist.strip()
    match = _HOST_EXPRESSION.match(text)
    if not match or text[match.end():match.end() + 1] not in ("", ","):
        raise ConfigError(f"{variable}={nodelist!r} is not a SLURM node list")

    def first_number(bracket: re.Match) -> str:
        return bracket[1].split(",")[0].split("-")[0]

    return re.sub(r"\[([^\]]+)\]", first_number, match.group(0))


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node number `node` from SLURM_TASKS_PER_NODE: '2(x3),1' means 2, 2, 2, 1."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r}: expected a form "
                              "like '4(x2),3'")
        counts += [int(match[1])] * int(match[2] or 1)
    if not 0 <= node < len(counts):
        raise ConfigError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={tasks_per_node!r} "
                          f"lists {len(counts)} nodes")
    return counts[node]


def _from_open_mpi(environ: Mapping[str, str]) -> LaunchEnv:
    values = _require_ints(environ, "open-mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    env = LaunchEnv(*values, launcher="open-mpi", world_size_var="OMPI_COMM_WORLD_SIZE")
    return _with_master(environ, env, derived_addr=_one_host_addr(env))


def _from_pmi(environ: Mapping[str, str]) -> LaunchEnv:
    values = _require_ints(environ, "pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                           "MPI_LOCALNRANKS")
    env = LaunchEnv(*values, launcher="pmi", world_size_var="PMI_SIZE")
    return _with_master(environ, env, derived_addr=_one_host_addr(env))


def _one_host_addr(env: LaunchEnv) -> str | None:
    """127.0.0.1 when every rank runs on this host (mpirun on one node names no rendezvous
    host, and needs none); None otherwise (MASTER_ADDR must say where rank 0 runs)."""
    return "127.0.0.1" if env.local_world_size == env.world_size else None


# (variables that reveal a launcher, its reader), in the order they are tried.
_LAUNCHERS = (
    (("RANK", "WORLD_SIZE"), _from_torchrun),
    (("SLURM_PROCID",), _from_slurm),
    (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), _from_open_mpi),
    (("PMI_RANK", "PMI_SIZE"), _from_pmi),
)


def _require_ints(environ: Mapping[str, str], launcher: str, *names: str) -> list[int]:
    """The named variables as integers; one ConfigError naming every missing or bad one."""
    missing = [name for name in names if name not in environ]
    bad = [f"{name}={environ[name]!r}" for name in names
           if name in environ and not _is_int(environ[name])]
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} not set")
    if bad:
        problems.append(f"not an integer: {', '.join(bad)}")
    if problems:
        raise ConfigError(f"{launcher} launch detected but {'; '.join(problems)}")
    return [int(environ[name]) for name in names]


def _optional_int(environ: Mapping[str, str], launcher: str, name: str, default: int) -> int:
    return _require_ints(environ, launcher, name)[0] if name in environ else default


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _with_master(environ: Mapping[str, str], env: LaunchEnv, derived_addr: str | None,
                 derived_port: int = DEFAULT_MASTER_PORT) -> LaunchEnv:
    """`env` with the rendezvous address: MASTER_ADDR/MASTER_PORT win over derived values."""
    addr = environ.get("MASTER_ADDR") or derived_addr
    port = _optional_int(environ, env.launcher, "MASTER_PORT", default=derived_port)
    if env.world_size > 1 and not addr:
        raise ConfigError(
            f"{env.launcher} launch of {env.world_size} processes but MASTER_ADDR is not set: "
            "export MASTER_ADDR=<host of rank 0> to every rank (with mpirun: -x MASTER_ADDR)")
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT must be a port number (1-65535), got {port}")
    return dataclasses.replace(env, master_addr=addr, master_port=port)


def _check_ranks(env: LaunchEnv) -> None:
    if env.world_size < 1:
        raise ConfigError(f"{env.launcher}: {env.world_size_var} must be at least 1, "
                          f"got {env.world_size}")
    if not 0 <= env.rank < env.world_size:
        raise ConfigError(f"{env.launcher}: rank {env.rank} is not in 0..{env.world_size - 1}, "
                          f"the {env.describe_world()}")
    if not 0 <= env.local_rank < env.local_world_size <= env.world_size:
        raise ConfigError(
            f"{env.launcher}: local rank {env.local_rank} of {env.local_world_size} processes "
            f"on this host does not fit the {env.describe_world()}")


def init_distributed(env: LaunchEnv, backend: str = "auto", timeout_s: float = 300) -> bool:
    """Join the process group described by `env`; False (and nothing done) for one process.

    backend "auto" is NCCL when CUDA is available (each rank then uses GPU `local_rank`) and
    gloo otherwise. `timeout_s` bounds both the rendezvous (waiting for every rank to arrive)
    and, with gloo, every later collective: a rank whose peer is alive but stuck raises after
    `timeout_s` instead of waiting forever. A peer that died is usually noticed at once, as a
    closed connection. Wrap the run in `fail_fast` so that either error ends the process.

    A rendezvous that fails (a rank never started, a wrong MASTER_ADDR) raises TrainingError
    naming the address, the world size and the launcher.
    """
    if env.world_size == 1:
        return False
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise TrainingError(f"a process group is already initialized as rank "
                                f"{dist.get_rank()} of {dist.get_world_size()}, not as "
                                f"rank {env.rank} of {env.world_size}")
        return True
    # A rank that the runtime aborts (gloo's threads call std::terminate on some teardown
    # races) or that crashes cannot print its own line; the launcher then says only "rank R
    # was killed by SIGABRT". Python's stacks of every thread, written as it dies, say
    # where: in a step, or while the interpreter shut down. Nothing is written otherwise.
    if not faulthandler.is_enabled():
        # A stderr without a file descriptor (a notebook's) cannot take them: go on without.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            faulthandler.enable(all_threads=True)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Let NCCL's watchdog end the process when a collective fails or times out, instead
        # of leaving it blocked in a kernel that waits for a dead peer. Already torch's
        # default (3); set explicitly so that an older default or a stray 0 cannot hang us.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        torch.cuda.set_device(env.local_rank)
    # env:// reads the rendezvous address from these two variables, which SLURM and MPI
    # launches may not have set: our derived values must be visible to it.
    os.environ["MASTER_ADDR"] = str(env.master_addr)
    os.environ["MASTER_PORT"] = str(env.master_port)
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as error:  # DistStoreError, DistNetworkError, gloo's RuntimeError
        raise TrainingError(
            f"could not form the process group at {env.master_addr}:{env.master_port} "
            f"({env.describe_world()}) within {timeout_s:g} s; is every rank started, and "
            f"does MASTER_ADDR name the host of rank 0? ({_first_line(error)})") from error
    # Objects in reference cycles that hold process groups or their pending work (a mesh, a
    # stream) would otherwise be freed during interpreter finalization, where freeing gloo's
    # work from its C++ threads can abort the process (pytorch/pytorch#179291; seen as
    # "terminate called without an active exception" after a 2-rank test's last line on a
    # loaded machine). atexit handlers run while the interpreter is still whole.
    atexit.register(gc.collect)
    return True


def shutdown_distributed() -> None:
    """Leave the process group, if any. Call it at the end of a successful run only: after a
    failure a peer may be gone, and `fail_fast` exits without waiting for it."""
    if dist.is_initialized():
        # Every rank is past its last collective before any closes its connections: a peer
        # closing while another's gloo thread still serves a collective aborts that process
        # ("terminate called without an active exception"), seen on 2 busy cores.
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(env: LaunchEnv) -> Iterator[None]:
    """End this rank at once, with a message, when the code inside raises.

    Why: when one rank fails, its peers are blocked in a collective that will never complete.
    They learn of it in one of two ways, and this turns both into an exit:
      - the failed process has exited: its sockets close, and gloo raises in the peers at
        once ("Connection reset by peer" / "Connection closed by peer"); on NCCL, the
        watchdog's async error handling ends the process;
      - the failed process is alive but stuck: with gloo, the peers' collectives raise after
        the process-group timeout (`init_distributed(timeout_s=...)`). That timeout is thus
        the upper bound on how long a rank waits for a peer; keep it above the longest
        stretch one rank may compute (or write a checkpoint) between two collectives.
    The exception becomes one line on stderr, `terabrain: rank R failed: <message>`, and exit
    code 1 (a ConfigError: `terabrain: error: rank R: <message>`, exit code 2, as the command
    line reports config errors; a pre-emption, `Preempted`: rank 0's one line and exit code
    75 on every rank, which all stopped at the same step). Errors raised outside torch.distributed that are not
    TrainingError print their traceback first, since they are bugs. The exit is `os._exit`,
    after flushing stdout and stderr: a normal exit runs atexit handlers and destructors (the
    process group's among them) that may wait for the dead peer, the hang this avoids.

    A single process (world size 1) has no peers to wait for: exceptions propagate unchanged.
    SystemExit always propagates: exiting is what it asks for already.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as error:
        if env.world_size == 1:
            raise
        code, line = _failure_report(env.rank, error)
        shared = isinstance(error, (Preempted, SharedConfigError))
        if shared and env.rank != 0:
            line = ""  # every rank stops at the same point for the same reason: rank 0 says so
        if code == 1 and not isinstance(error, TrainingError) and not _in_distributed(error):
            traceback.print_exception(error, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # One write call: lines from many ranks sharing a terminal or log stay whole.
        if line:
            os.write(sys.stderr.fileno(), f"{line}\n".encode())
        if shared:
            # Every rank is alive and here: wait for rank 0's line before any rank exits, so
            # that a launcher which ends the others when one exits (srun --kill-on-bad-exit)
            # cannot cut it short.
            with contextlib.suppress(Exception):
                dist.barrier()
            if env.rank != 0 and _HYDRA_CONTROL in os.environ:
                # MPICH's mpiexec (hydra 4.0) keeps only the first exit status it sees after it
                # forwarded a signal to the ranks; those that exit together with it are recorded
                # as 0, and mpiexec may then exit 0 for a pre-empted job (measured: 2 runs in
                # 5). Rank 0 exits first, so mpiexec returns its code.
                time.sleep(_HYDRA_EXIT_STAGGER_S)
        os._exit(code)


# Set by MPICH's hydra launcher in every rank's environment.
_HYDRA_CONTROL = "HYDI_CONTROL_FD"
_HYDRA_EXIT_STAGGER_S = 1.0


def _failure_report(rank: int, error: BaseException) -> tuple[int, str]:
    """(exit code, message line) for an exception that ends rank `rank`."""
    prefix = f"terabrain: rank {rank} failed:"
    if isinstance(error, Preempted):
        return PREEMPTED_EXIT_CODE, f"terabrain: {error}"
    if isinstance(error, SharedConfigError):
        return 2, f"terabrain: error: {error}"
    if isinstance(error, ConfigError):
        return 2, f"terabrain: error: rank {rank}: {error}"
    if isinstance(error, KeyboardInterrupt):
        return 130, f"{prefix} interrupted"
    if isinstance(error, TrainingError):
        return 1, f"{prefix} {_first_line(error)}"
    if _in_distributed(error):
        return 1, (f"{prefix} {_first_line(error)} (in a collective called at "
                   f"{_caller_outside_torch(error)}: a peer rank failed or stalled first; "
                   "look for its message)")
    return 1, f"{prefix} {type(error).__name__}: {_first_line(error)}"


_TORCH_DIR = os.path.dirname(torch.__file__)
_DISTRIBUTED_DIR = os.path.dirname(dist.__file__)


# How gloo, NCCL and c10d word a failed or stalled peer, for collectives whose raising frame
# is not torch.distributed's own (DTensor's run as torch ops; backward ones in autograd).
_PEER_FAILURE = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|timed out|"
    r"\bgloo\b|\bNCCL\b|c10d|ProcessGroup|remote worker", re.IGNORECASE)


def _in_distributed(error: BaseException) -> bool:
    """Whether `error` came out of a collective: a dead or stalled peer, usually.

    gloo reports a dead or stuck peer as a plain RuntimeError, so the type cannot tell; where
    it was raised can. The innermost frame is torch.distributed's for a plain collective.
    DTensor's collectives run as torch ops (the innermost frame is torch/_ops.py or torch's
    autograd), so for an error raised inside torch, a torch.distributed frame anywhere in
    the stack, or a message in the words of gloo/NCCL/c10d, counts too. A bug in our own code
    raises outside torch and keeps its traceback.
    """
    if isinstance(error, dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or not frames[-1].filename.startswith(_TORCH_DIR):
        return False
    if frames[-1].filename.startswith(_DISTRIBUTED_DIR):
        return True
    if not isinstance(error, RuntimeError):
        return False
    return (any(frame.filename.startswith(_DISTRIBUTED_DIR) for frame in frames)
            or bool(_PEER_FAILURE.search(str(error))))


def _caller_outside_torch(error: BaseException) -> str:
    """'train.py:42', the innermost frame of `error` that is not torch's own code."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_TORCH_DIR)]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def _first_line(error: BaseException) -> str:
    # torch's C++ errors append a multi-line C++ stack, and gloo's start with the source
    # location of the check that failed; the message is what lies between.
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", lines[0]) if lines else type(error).__name__
