"""One rank of a multi-process test, run under torchrun: locally connected layers split by
output rows across all ranks (the spatial plan) against the same layers in one process.

Each rank builds the whole layer (same seed) as the reference and the partitioned one
(from a meta-device build for some cases, so its rows are initialised where they live).
For each case it compares, gathered across ranks: the forward output, ``transpose``, and
the gradients of the weights, bias and input of a RICA-style reconstruction loss
``|T(F(x)) - x|^2 + <F(x), u>``; then stacks with LCN and L2, max and average pooling
(output and gradients). Prints `rank R: CASE ok (max diff)` per case and
`rank R: all cases ok` at the end.
"""

import torch
import torch.distributed as dist
from torch import nn

from terabrain.nn.local import LocallyConnected2d
from terabrain.nn.normalization import LocalContrastNorm
from terabrain.nn.pooling import L2Pool2d
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.spatial import gather_rows, partition_spatially, scatter_rows, split_rows

BATCH = 3

CASES = {
    # name: (in, out, (H, W), kernel, stride, bias, from meta)
    "overlap-k4-s2": (3, 4, (21, 9), 4, 2, False, False),
    "overlap-bias-meta": (2, 3, (18, 10), 5, 3, True, True),
    "gaps-k2-s3": (2, 2, (20, 7), 2, 3, True, False),
    "wide-halo-k7-s1": (1, 2, (12, 8), 7, 1, False, True),  # halo spans several ranks
}


def build(case, meta):
    cin, cout, size, kernel, stride, bias, _ = case
    if meta:
        with torch.device("meta"):
            return LocallyConnected2d(cin, cout, size, kernel, stride, bias=bias, seed=7)
    return LocallyConnected2d(cin, cout, size, kernel, stride, bias=bias, seed=7)


def reconstruction_loss(layer, x, u):
    codes = layer(x)
    return (layer.transpose(codes) - x).pow(2).sum() + (codes * u).sum(), codes


def largest_difference(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def check_case(name, case, mesh, group):
    torch.manual_seed(0)
    reference = build(case, meta=False)
    if reference.bias is not None:
        nn.init.normal_(reference.bias)
    x = torch.randn(BATCH, case[0], *case[2])
    u = torch.randn(BATCH, case[1], *reference.output_size)
    codes_in = torch.randn(BATCH, case[1], *reference.output_size)

    full_x = x.clone().requires_grad_()
    loss, codes = reference_loss = reconstruction_loss(reference, full_x, u)
    loss.backward()
    full_transpose = reference.transpose(codes_in)

    layer = partition_spatially(build(case, meta=case[6]), mesh)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(split_rows(reference.bias[None], layer.block.output_rows)[0])
    block = layer.block
    local_x = split_rows(x, block.owned_rows).clone().requires_grad_()
    scattered = scatter_rows(x if dist.get_rank(group) == 0 else None,
                             [b.owned_rows for b in layer.blocks], group)
    assert torch.equal(scattered, local_x.detach()), f"{name}: scatter_rows"
    local_u = split_rows(u, block.output_rows)
    local_loss, local_codes = reconstruction_loss(layer, local_x, local_u)
    local_loss.backward()
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=group)

    width = reference.output_size[1]
    output_blocks = [b.output_rows for b in layer.blocks]
    location_blocks = [(a * width, b * width) for a, b in output_blocks]
    owned_blocks = [b.owned_rows for b in layer.blocks]
    local_transpose = layer.transpose(split_rows(codes_in, block.output_rows))
    comparisons = {
        "loss": (total, loss.detach()),
        "forward": (gather_rows(local_codes.detach(), output_blocks, group), codes.detach()),
        "transpose": (gather_rows(local_transpose, owned_blocks, group), full_transpose.detach()),
        "weight": (gather_rows(layer.weight.detach(), location_blocks, group, dim=0),
                   reference.weight.detach()),
        "weight grad": (gather_rows(layer.weight.grad, location_blocks, group, dim=0),
                        reference.weight.grad),
        "input grad": (gather_rows(local_x.grad, owned_blocks, group), full_x.grad),
    }
    full = layer.full_parameters()
    comparisons["full_parameters weight"] = (full["weight"], reference.weight.detach())
    if reference.bias is not None:
        comparisons["full_parameters bias"] = (full["bias"], reference.bias.detach())
        comparisons["bias grad"] = (gather_rows(layer.bias.grad, output_blocks, group, dim=1),
                                    reference.bias.grad)
    worst = 0.0
    for what, (got, want) in comparisons.items():
        assert got.shape == want.shape, (name, what, got.shape, want.shape)
        difference = largest_difference(got, want)
        assert difference < 1e-5, f"{name}: {what} differs by {difference:.2e}"
        worst = max(worst, difference)
    return worst


def check_stack(mesh, group):
    """LCN, layer, L2 pooling, LCN, layer, L2 pooling (stride 2), LCN (seeds 000 and Le et al.
    2012): each reads the previous one's output rows as its own input rows, so only halos
    (and LCN's per-image sums) move between them."""
    torch.manual_seed(1)
    stack = nn.Sequential(LocalContrastNorm(5), LocallyConnected2d(2, 3, (26, 10), 4, 2, seed=3),
                          L2Pool2d(3, 1, 1), LocalContrastNorm(5),
                          LocallyConnected2d(3, 2, (12, 4), 3, 1, seed=4),
                          L2Pool2d(2, 2), LocalContrastNorm(3))
    x = torch.randn(BATCH, 2, 26, 10)
    full_x = x.clone().requires_grad_()
    stack(full_x).pow(2).sum().backward()
    reference_grads = [p.grad.clone() for p in stack.parameters()]
    assert len(reference_grads) == 2
    expected = stack(x).detach()

    parted = partition_spatially(stack, mesh)
    first, second = parted[1], parted[4]
    assert [b.owned_rows for b in parted[0].blocks] == [b.owned_rows for b in first.blocks]
    assert [b.owned_rows for b in parted[2].blocks] == [b.output_rows for b in first.blocks]
    assert [b.owned_rows for b in second.blocks] == [b.output_rows for b in parted[2].blocks]
    assert [b.owned_rows for b in parted[6].blocks] == [b.output_rows for b in parted[5].blocks]
    local_x = split_rows(x, first.block.owned_rows).clone().requires_grad_()
    local_y = parted(local_x)
    local_y.pow(2).sum().backward()
    got = gather_rows(local_y.detach(), [b.owned_rows for b in parted[6].blocks], group)
    assert got.shape == expected.shape
    worst = largest_difference(got, expected)
    for layer, want in zip((first, second), reference_grads):
        width = layer.output_size[1]
        blocks = [(a * width, b * width) for a, b in (b.output_rows for b in layer.blocks)]
        worst = max(worst, largest_difference(gather_rows(layer.weight.grad, blocks, group, dim=0), want))
    grad_x = gather_rows(local_x.grad, [b.owned_rows for b in first.blocks], group)
    worst = max(worst, largest_difference(grad_x, full_x.grad))
    assert worst < 1e-5, f"stack differs by {worst:.2e}"
    return worst


def check_max_and_average_pooling(mesh, group):
    """Layer, max pooling (stride 2), average pooling (stride 1), LCN: both poolings are
    split by rows like L2 pooling (halo rows where windows cross block edges)."""
    torch.manual_seed(2)
    stack = nn.Sequential(LocallyConnected2d(2, 3, (22, 9), 3, 1, seed=5), nn.MaxPool2d(3, 2),
                          nn.AvgPool2d(2, 1), LocalContrastNorm(3))
    x = torch.randn(BATCH, 2, 22, 9)
    full_x = x.clone().requires_grad_()
    expected = stack(full_x)
    expected.pow(2).sum().backward()
    weight_grad = stack[0].weight.grad
    parted = partition_spatially(stack, mesh)
    layer = parted[0]
    local_x = split_rows(x, layer.block.owned_rows).clone().requires_grad_()
    local_y = parted(local_x)
    local_y.pow(2).sum().backward()
    width = layer.output_size[1]
    locations = [(a * width, b * width) for a, b in (b.output_rows for b in layer.blocks)]
    pairs = [(gather_rows(local_y.detach(), parted[3].output_blocks, group), expected.detach()),
             (gather_rows(layer.weight.grad, locations, group, dim=0), weight_grad),
             (gather_rows(local_x.grad, [b.owned_rows for b in layer.blocks], group), full_x.grad)]
    worst = 0.0
    for got, want in pairs:
        assert got.shape == want.shape, (got.shape, want.shape)
        worst = max(worst, largest_difference(got, want))
    assert worst < 1e-5, f"max/average pooling stack differs by {worst:.2e}"
    return worst


def main():
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=60)
        mesh = build_mesh(1, env.world_size, env)
        group = mesh.get_group("model")
        for name, case in CASES.items():
            worst = check_case(name, case, mesh, group)
            print(f"rank {env.rank}: {name} ok ({worst:.1e})", flush=True)
        print(f"rank {env.rank}: stack ok ({check_stack(mesh, group):.1e})", flush=True)
        worst = check_max_and_average_pooling(mesh, group)
        print(f"rank {env.rank}: max/average pooling ok ({worst:.1e})", flush=True)
        if env.world_size == 4:
            # Data x model 2 x 2: halos travel inside each model group (global ranks {0, 1}
            # and {2, 3}), while the other group does the same.
            grid = build_mesh(2, 2, env)
            worst = check_case("overlap-k4-s2", CASES["overlap-k4-s2"], grid, grid.get_group("model"))
            print(f"rank {env.rank}: 2x2 mesh ok ({worst:.1e})", flush=True)
        shutdown_distributed()
    print(f"rank {env.rank}: all cases ok", flush=True)


if __name__ == "__main__":
    main()
