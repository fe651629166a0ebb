"""One rank of a multi-process test, run under torchrun: for each mesh shape on the command
line ("2x2", "-1x2", ...), build the mesh and all-reduce along each of its dimensions.

Prints `rank R: mesh DxM ok` per mesh and `rank R: all meshes ok` at the end. A mesh that does
not fit the world makes every rank exit with code 2 and a message, through fail_fast.
"""

import sys

import torch
import torch.distributed as dist

from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)


def check_mesh(mesh, rank: int) -> None:
    data, model = mesh.shape
    # Row-major layout: rank = data_index * model + model_index.
    data_index, model_index = rank // model, rank % model
    assert list(mesh.get_coordinate()) == [data_index, model_index], mesh.get_coordinate()
    expected_groups = {
        "data": [d * model + model_index for d in range(data)],
        "model": [data_index * model + m for m in range(model)],
    }
    for dim, expected_ranks in expected_groups.items():
        group = mesh.get_group(dim)
        assert dist.get_process_group_ranks(group) == expected_ranks, (dim, expected_ranks)
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value, group=group)
        expected_sum = sum(r + 1 for r in expected_ranks)
        assert value.item() == expected_sum, (dim, value.item(), expected_sum)


def main(shapes: list[str]) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=60)
        for shape in shapes:
            data, model = (int(size) for size in shape.split("x"))
            mesh = build_mesh(data, model, env)
            check_mesh(mesh, env.rank)
            print(f"rank {env.rank}: mesh {mesh.shape[0]}x{mesh.shape[1]} ok", flush=True)
        shutdown_distributed()
    print(f"rank {env.rank}: all meshes ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
