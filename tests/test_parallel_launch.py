"""Launcher detection, process-group setup, the 2-D mesh, and failure behaviour.

Detection is tested on fabricated environments, one per launcher. Everything else starts real
processes on CPU/gloo: 2 and 4 ranks under torchrun, and a hand-launched pair of ranks where
one dies or hangs, to check that the other exits with a message instead of hanging.
"""

import re
import signal
import subprocess
import sys
import time

import pytest

from terabrain.errors import ConfigError
from terabrain.parallel import (
    LaunchEnv, build_mesh, detect_launch_env, fail_fast, init_distributed, resolve_mesh_shape,
)
from terabrain.parallel.launch import first_host, tasks_on_node

from conftest import REPO, SCRIPTS, clean_environ as _clean_environ, free_port as _free_port, torchrun

# --- detection: torchrun ------------------------------------------------------------------

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}


def test_no_launcher_variables_mean_a_single_process():
    env = detect_launch_env({"HOME": "/root", "SLURM_JOB_ID": "7"})
    assert env == LaunchEnv(rank=0, world_size=1, launcher="none")


def test_torchrun():
    assert detect_launch_env(TORCHRUN) == LaunchEnv(
        rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="10.0.0.1",
        master_port=29400, launcher="torchrun", world_size_var="WORLD_SIZE")


def test_hand_made_env_launch_defaults_to_one_host_and_port_29500():
    env = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert (env.local_rank, env.local_world_size, env.master_port) == (1, 2, 29500)


def test_torchrun_wins_over_the_slurm_step_that_started_it():
    env = detect_launch_env({**TORCHRUN, **SLURM})
    assert env.launcher == "torchrun" and env.rank == 3


@pytest.mark.parametrize("change, named", [
    ({"WORLD_SIZE": None}, "WORLD_SIZE not set"),
    ({"RANK": "two"}, "RANK='two'"),
    ({"LOCAL_RANK": "1.5"}, "LOCAL_RANK='1.5'"),
    ({"RANK": "4"}, "rank 4 is not in 0..3, the world size 4"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE must be at least 1"),
    ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({"LOCAL_WORLD_SIZE": "8"}, "local rank 1 of 8"),
], ids=lambda value: str(value)[:30])
def test_torchrun_errors_name_the_variable(change, named):
    environ = {k: v for k, v in {**TORCHRUN, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        detect_launch_env(environ)


def test_one_process_needs_no_master_address():
    assert detect_launch_env({"RANK": "0", "WORLD_SIZE": "1"}).master_addr is None


# --- detection: SLURM ---------------------------------------------------------------------

SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "node[01-03,07],gpu5", "SLURM_LAUNCH_NODE_IPADDR": "10.1.1.1"}


def test_slurm():
    assert detect_launch_env(SLURM) == LaunchEnv(
        rank=5, world_size=8, local_rank=1, local_world_size=4, master_addr="node01",
        master_port=15000 + 123456 % 10000, launcher="slurm", world_size_var="SLURM_NTASKS")


def test_slurm_port_is_the_same_for_every_rank_of_a_job_and_differs_between_jobs():
    rank_0 = detect_launch_env({**SLURM, "SLURM_PROCID": "0", "SLURM_NODEID": "0"})
    other_job = detect_launch_env({**SLURM, "SLURM_JOB_ID": "123457"})
    assert rank_0.master_port == detect_launch_env(SLURM).master_port != other_job.master_port


def test_slurm_explicit_master_and_tasks_per_node_win():
    env = detect_launch_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234",
                             "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "junk"})
    assert (env.master_addr, env.master_port, env.local_world_size) == ("head", 1234, 4)


def test_slurm_step_nodelist_first_then_launch_node_as_last_resort():
    step = {**SLURM, "SLURM_STEP_NODELIST": "gpu[7-8]"}
    assert detect_launch_env(step).master_addr == "gpu7"
    no_list = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert detect_launch_env(no_list).master_addr == "10.1.1.1"


def test_slurm_uneven_tasks_per_node():
    env = detect_launch_env({**SLURM, "SLURM_NTASKS": "7", "SLURM_PROCID": "6",
                             "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
                             "SLURM_TASKS_PER_NODE": "2(x3),1"})
    assert env.local_world_size == 1


@pytest.mark.parametrize("change, named", [
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID not set"),
    ({"SLURM_NTASKS": "x", "SLURM_LOCALID": None}, "SLURM_LOCALID not set; not an integer: "
                                                   "SLURM_NTASKS='x'"),
    ({"SLURM_TASKS_PER_NODE": None}, "neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE"),
    ({"SLURM_TASKS_PER_NODE": "4x2"}, "SLURM_TASKS_PER_NODE='4x2'"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({"SLURM_JOB_NODELIST": "node[01"}, "SLURM_JOB_NODELIST='node\\[01'"),
    ({"SLURM_JOB_NODELIST": None, "SLURM_LAUNCH_NODE_IPADDR": None}, "MASTER_ADDR is not set"),
], ids=lambda value: str(value)[:30])
def test_slurm_errors_name_the_variable(change, named):
    environ = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=named):
        detect_launch_env(environ)


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-03,07],gpu5", "node01"),
    ("gpu5,node[1-2]", "gpu5"),
    ("node07", "node07"),
    ("rack[1-2]-n[05,07-09]", "rack1-n05"),
    ("n[3,1]", "n3"),
    ("  c1-[0010-0012] ", "c1-0010"),
])
def test_first_host_of_a_compressed_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01", "node[]", "node[a-b]", "a]b", "[", ",a"])
def test_malformed_nodelist_is_a_config_error(nodelist):
    with pytest.raises(ConfigError, match="not a SLURM node list"):
        first_host(nodelist)


def test_tasks_per_node():
    assert [tasks_on_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8


# --- detection: MPI -----------------------------------------------------------------------

OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_ADDR": "host0"}
PMI = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
       "MASTER_ADDR": "host0", "MASTER_PORT": "3000"}


def test_open_mpi():
    assert detect_launch_env(OPEN_MPI) == LaunchEnv(
        rank=2, world_size=4, local_rank=0, local_world_size=2, master_addr="host0",
        master_port=29500, launcher="open-mpi", world_size_var="OMPI_COMM_WORLD_SIZE")


def test_mpich_intel_mpi_pmi():
    assert detect_launch_env(PMI) == LaunchEnv(
        rank=1, world_size=2, local_rank=1, local_world_size=2, master_addr="host0",
        master_port=3000, launcher="pmi", world_size_var="PMI_SIZE")


@pytest.mark.parametrize("environ, drop, named", [
    (OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_SIZE", "open-mpi launch detected but "
                                             "OMPI_COMM_WORLD_LOCAL_SIZE not set"),
    (OPEN_MPI, "MASTER_ADDR", "mpirun: -x MASTER_ADDR"),
    (PMI, "PMI_SIZE", "pmi launch detected but PMI_SIZE not set"),
    (PMI, "MPI_LOCALRANKID", "MPI_LOCALRANKID not set"),
])
def test_mpi_errors_name_the_variable(environ, drop, named):
    with pytest.raises(ConfigError, match=named):
        detect_launch_env({k: v for k, v in environ.items() if k != drop})


@pytest.mark.parametrize("environ", [OPEN_MPI, PMI], ids=["open-mpi", "pmi"])
def test_mpirun_on_one_host_needs_no_master_address(environ):
    """Every rank on this host (local size = world size): rank 0 is on 127.0.0.1. Ranks on
    several hosts still need MASTER_ADDR (test above)."""
    one_host = {k: v for k, v in environ.items() if k != "MASTER_ADDR"}
    one_host.update({"OMPI_COMM_WORLD_LOCAL_SIZE": one_host["OMPI_COMM_WORLD_SIZE"]}
                    if "OMPI_COMM_WORLD_SIZE" in one_host else {})
    assert detect_launch_env(one_host).master_addr == "127.0.0.1"


# --- mesh shape and single-process behaviour ----------------------------------------------

FOUR_TORCHRUN = LaunchEnv(rank=0, world_size=4, master_addr="h", master_port=1,
                          launcher="torchrun", world_size_var="WORLD_SIZE")


@pytest.mark.parametrize("data, model, shape", [
    (2, 2, (2, 2)), (-1, 2, (2, 2)), (4, -1, (4, 1)), (-1, 1, (4, 1)), (1, 4, (1, 4)),
])
def test_mesh_shape_with_the_rest_marker(data, model, shape):
    assert resolve_mesh_shape(data, model, FOUR_TORCHRUN) == shape


def test_mesh_that_does_not_fit_names_fields_world_and_launcher_variable():
    with pytest.raises(ConfigError) as caught:
        resolve_mesh_shape(3, 1, FOUR_TORCHRUN)
    for part in ("parallel.data", "parallel.model", "3 × 1 = 3", "world size 4", "WORLD_SIZE"):
        assert part in str(caught.value)
    slurm_env = LaunchEnv(world_size=6, launcher="slurm", world_size_var="SLURM_NTASKS")
    with pytest.raises(ConfigError, match=r"parallel.model=4 does not divide the world size 6 "
                                          r"\(SLURM_NTASKS, set by slurm\)"):
        resolve_mesh_shape(-1, 4, slurm_env)


@pytest.mark.parametrize("data, model, named", [
    (-1, -1, "cannot both be -1"), (0, 4, "parallel.data must be"), (2, -2, "parallel.model"),
])
def test_invalid_mesh_sizes(data, model, named):
    with pytest.raises(ConfigError, match=named):
        resolve_mesh_shape(data, model, FOUR_TORCHRUN)


def test_single_process_needs_no_process_group_and_no_mesh():
    alone = LaunchEnv()
    assert init_distributed(alone) is False
    assert build_mesh(1, 1, alone) is None and build_mesh(-1, 1, alone) is None
    with pytest.raises(ConfigError, match=r"world size 1 \(no launcher detected"):
        build_mesh(2, 1, alone)


def test_single_process_exceptions_propagate_through_fail_fast():
    with pytest.raises(ValueError), fail_fast(LaunchEnv()):
        raise ValueError("plain error")


# --- real processes -----------------------------------------------------------------------


def _torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return torchrun(nproc, str(SCRIPTS / "mesh_collectives.py"), *args, timeout=timeout)


def test_four_ranks_2x2_mesh_and_its_variants():
    result = _torchrun(4, "2x2", "-1x2", "4x1", "1x-1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in range(4):
        for shape in ("2x2", "4x1", "1x4"):
            assert f"rank {rank}: mesh {shape} ok" in output
        assert f"rank {rank}: all meshes ok" in output


def test_two_ranks_1x2_and_2x1_meshes():
    result = _torchrun(2, "1x2", "2x1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in range(2):
        assert f"rank {rank}: mesh 1x2 ok" in output and f"rank {rank}: mesh 2x1 ok" in output
        assert f"rank {rank}: all meshes ok" in output


def test_mesh_that_does_not_fit_the_world_stops_every_rank_with_exit_code_2():
    result = _torchrun(2, "3x1")
    assert result.returncode != 0
    for rank in range(2):
        assert (f"terabrain: error: rank {rank}: parallel.data × parallel.model = 3 × 1 = 3 "
                "ranks, but the world size 2 (WORLD_SIZE, set by torchrun)") in result.stderr
    # torchrun reports each child's exit code: all of them are 2, the code for config errors.
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)) == {"2"}, result.stderr


def _launch_pair(failing_rank: int, how: str, timeout_s: float,
                 collective: str = "all_reduce") -> list[subprocess.Popen]:
    """Ranks 0 and 1 of peer_failure.py, started by hand so each one's output is its own."""
    port = _free_port()
    ranks = []
    for rank in range(2):
        environ = {**_clean_environ(), "RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, str(SCRIPTS / "peer_failure.py"), str(failing_rank), how,
                   str(timeout_s), collective]
        ranks.append(subprocess.Popen(command, env=environ, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return ranks


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    return process.returncode, output


@pytest.mark.parametrize("collective", ["all_reduce", "dtensor", "dtensor_backward"])
def test_when_a_rank_dies_its_peer_exits_with_a_message_long_before_the_timeout(collective):
    """One line and no traceback, whichever collective the peer was in: DTensor's run as torch
    ops and in autograd's backward, not from torch.distributed's Python."""
    timeout_s = 20
    start = time.monotonic()
    rank_0, rank_1 = _launch_pair(failing_rank=1, how="exit", timeout_s=timeout_s,
                                  collective=collective)
    code_0, output_0 = _finish(rank_0, timeout=60)
    elapsed = time.monotonic() - start
    code_1, output_1 = _finish(rank_1, timeout=30)
    assert code_1 == 3, output_1
    assert code_0 == 1, output_0
    assert "rank 0: joined" in output_0
    assert "terabrain: rank 0 failed: " in output_0 and "Traceback" not in output_0
    assert output_0.strip().splitlines()[1:] == [
        line for line in output_0.strip().splitlines() if "rank 0 failed" in line], output_0
    assert "a peer rank failed or stalled first" in output_0
    assert "unexpectedly succeeded" not in output_0
    # A dead peer closes its sockets: gloo notices at once, not after the timeout.
    assert "Timed out" not in output_0 and elapsed < 60


def test_a_rank_the_runtime_aborts_writes_where_it_was_and_its_peer_one_line():
    """A rank that dies by SIGABRT (gloo's threads call std::terminate on some teardown
    races) cannot print a line of its own: Python's stack of every thread, written as it
    dies (faulthandler, enabled by init_distributed), says where it was."""
    rank_0, rank_1 = _launch_pair(failing_rank=1, how="abort", timeout_s=20)
    code_0, output_0 = _finish(rank_0, timeout=60)
    code_1, output_1 = _finish(rank_1, timeout=30)
    assert code_1 == -signal.SIGABRT, output_1
    assert "Fatal Python error: Aborted" in output_1, output_1
    assert "in abort_like_the_runtime" in output_1 and "in main" in output_1, output_1
    assert code_0 == 1 and "terabrain: rank 0 failed: " in output_0, output_0
    assert "Fatal Python error" not in output_0, output_0


def test_when_a_rank_hangs_its_peer_exits_after_the_process_group_timeout():
    timeout_s = 4
    start = time.monotonic()
    rank_0, rank_1 = _launch_pair(failing_rank=1, how="hang", timeout_s=timeout_s)
    try:
        code_0, output_0 = _finish(rank_0, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        rank_1.kill()  # it sleeps forever by design
        _finish(rank_1, timeout=30)
    assert code_0 == 1, output_0
    assert "terabrain: rank 0 failed: Timed out waiting 4000ms" in output_0
    assert timeout_s < elapsed < timeout_s + 40


def test_a_rank_that_never_arrives_fails_the_rendezvous_after_the_timeout():
    environ = {**_clean_environ(), "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port())}
    command = [sys.executable, str(SCRIPTS / "peer_failure.py"), "1", "exit", "3"]
    result = subprocess.run(command, env=environ, cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert ("terabrain: rank 0 failed: could not form the process group at 127.0.0.1:"
            in result.stderr)
    assert "world size 2 (WORLD_SIZE, set by torchrun)" in result.stderr


def test_fail_fast_prints_a_bug_s_traceback_and_skips_exit_handlers():
    program = (
        "import atexit\n"
        "from terabrain.parallel import LaunchEnv, fail_fast\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "with fail_fast(LaunchEnv(rank=1, world_size=2)):\n"
        "    {}['missing']\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=_clean_environ())
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith("terabrain: rank 1 failed: KeyError: 'missing'")
    assert "exit handler ran" not in result.stdout
