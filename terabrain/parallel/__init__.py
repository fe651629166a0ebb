"""Running one experiment on many processes: launcher detection, process group, device mesh.

`launch` turns the launcher's environment (torchrun, srun, mpirun, mpiexec) into a process
group and makes a failing rank end the run everywhere; `mesh` lays the ranks out as the
(data × model) DeviceMesh that parallel plans use.
"""

from terabrain.parallel.launch import (
    LaunchEnv,
    detect_launch_env,
    fail_fast,
    init_distributed,
    shutdown_distributed,
)
from terabrain.parallel.mesh import build_mesh, resolve_mesh_shape

__all__ = [
    "LaunchEnv",
    "build_mesh",
    "detect_launch_env",
    "fail_fast",
    "init_distributed",
    "resolve_mesh_shape",
    "shutdown_distributed",
]
