"""The 2-D device mesh every parallel plan works on: ranks laid out as data × model.

Ranks are numbered row-major, so the ranks of one model-parallel group are consecutive
(mesh (2, 2): model groups {0, 1} and {2, 3}, data groups {0, 2} and {1, 3}). Launchers number
the ranks of one host consecutively, so model parallelism, which talks on every layer, stays
within a host as long as `model` divides the number of ranks per host; data parallelism, which
talks once per step, crosses hosts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from terabrain.errors import ConfigError
from terabrain.parallel.launch import LaunchEnv

MESH_DIM_NAMES = ("data", "model")


def resolve_mesh_shape(data: int, model: int, env: LaunchEnv) -> tuple[int, int]:
    """(data, model) with a -1 replaced by "the rest of the world"; checks that it fits.

    Raises ConfigError naming `parallel.data`, `parallel.model`, the world size and the launcher
    variable it came from, since the fix is to change one of them.
    """
    world = env.world_size
    for name, size in (("parallel.data", data), ("parallel.model", model)):
        if size != -1 and size < 1:
            raise ConfigError(f"{name} must be a positive number of ranks or -1 (the rest of "
                              f"the world), got {size}")
    if data == -1 and model == -1:
        raise ConfigError("parallel.data and parallel.model cannot both be -1: set one of them")
    if -1 in (data, model):
        given_name, given = ("parallel.model", model) if data == -1 else ("parallel.data", data)
        if world % given:
            raise ConfigError(
                f"{given_name}={given} does not divide the {env.describe_world()}, so the "
                f"other mesh dimension (-1) cannot take the rest")
        data, model = (world // model, model) if data == -1 else (data, world // data)
    if data * model != world:
        raise ConfigError(
            f"parallel.data × parallel.model = {data} × {model} = {data * model} ranks, but "
            f"the {env.describe_world()}: change one of them, or set one to -1")
    return data, model


def build_mesh(data: int, model: int, env: LaunchEnv) -> DeviceMesh | None:
    """The (data, model) DeviceMesh over all ranks, dimensions named "data" and "model".

    None for a single process with data = model = 1: nothing to parallelize, and no process
    group to build a mesh on. Call `init_distributed` first: init_device_mesh would otherwise
    create a process group itself, with torch's defaults instead of ours (timeout, backend).
    `mesh.get_group("data")` is this rank's data-parallel group, and likewise for "model".
    """
    data, model = resolve_mesh_shape(data, model, env)
    if env.world_size == 1:
        return None
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs the process group: call init_distributed(env) "
                           "first")
    # The mesh's device type must match the process group's backend: NCCL groups are CUDA.
    device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (data, model), mesh_dim_names=MESH_DIM_NAMES)
