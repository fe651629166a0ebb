"""One rank of a multi-process test, run under torchrun: locally connected layers split by
rows across all ranks by the production spatial plan
(``terabrain.parallel.spatial_network.partition_network``) against the same layers in one
process.

Each rank builds the whole network (same seed) as the reference and the partitioned one
(from a meta-device build for some cases, so its rows are initialised where they live).
For each one-layer case it compares, gathered across ranks: the codes (the forward map),
the reconstruction (the transpose map), the weights, and the gradients of the weights, bias
and input of a RICA-style reconstruction loss ``|T(F(x)) - x|^2 + <F(x), u>``; then stacks
of layers with LCN and L2, max and average pooling (output and gradients). Prints
`rank R: CASE ok (max diff)` per case and `rank R: all cases ok` at the end.
"""

import torch
import torch.distributed as dist

from terabrain.config.schema import LayerConfig
from terabrain.nn.deep import DeepNetwork
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.spatial import gather_rows, scatter_rows, split_rows
from terabrain.parallel.spatial_network import partition_network

BATCH = 3

CASES = {
    # name: (in, out, (H, W), kernel, stride, tied, from meta)
    "overlap-k4-s2": (3, 4, (21, 9), 4, 2, True, False),
    "overlap-untied-meta": (2, 3, (18, 10), 5, 3, False, True),
    "gaps-k2-s3": (2, 2, (20, 7), 2, 3, False, False),
    "wide-halo-k7-s1": (1, 2, (12, 8), 7, 1, True, True),  # halo spans several ranks
}


def build(layers, shape, seed, mesh=None, meta=False):
    """The network; split by ``mesh`` (its 1-D model axis) when given."""
    if not meta:
        network = DeepNetwork(layers, shape, seed=seed)
    else:
        with torch.device("meta"):
            network = DeepNetwork(layers, shape, seed=seed)
    return network if mesh is None else partition_network(network, mesh)


def case_network(case, mesh=None):
    cin, cout, size, kernel, stride, tied, meta = case
    layers = [LayerConfig(kind="local", maps=cout, kernel=kernel, stride=stride, tied=tied)]
    return build(layers, (cin, *size), 7, mesh, meta and mesh is not None)


def reconstruction_loss(layer, x, u):
    codes, reconstruction = layer(x)
    return (reconstruction - x).pow(2).sum() + (codes * u).sum(), codes, reconstruction


def largest_difference(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def check_case(name, case, mesh, group):
    torch.manual_seed(0)
    reference = case_network(case).layers[0]
    with torch.no_grad():
        reference.bias.normal_()
    x = torch.randn(BATCH, case[0], *case[2])
    u = torch.randn(BATCH, *reference.out_shape)

    full_x = x.clone().requires_grad_()
    loss, codes, reconstruction = reconstruction_loss(reference, full_x, u)
    loss.backward()

    layer = case_network(case, mesh).layers[0]
    block = layer.block
    with torch.no_grad():
        layer.bias.copy_(split_rows(reference.bias[None], layer.owned_rows)[0])
    local_x = split_rows(x, layer.owned_rows).clone().requires_grad_()
    scattered = scatter_rows(x if dist.get_rank(group) == 0 else None, layer.input_blocks, group)
    assert torch.equal(scattered, local_x.detach()), f"{name}: scatter_rows"
    local_u = split_rows(u, block.output_rows)
    local_loss, local_codes, local_reconstruction = reconstruction_loss(layer, local_x, local_u)
    local_loss.backward()
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=group)

    width = layer.out_width
    output_blocks = layer.output_blocks
    location_blocks = [(a * width, b * width) for a, b in output_blocks]
    owned_blocks = layer.input_blocks
    comparisons = {
        "loss": (total, loss.detach()),
        "forward": (gather_rows(local_codes.detach(), output_blocks, group), codes.detach()),
        "transpose": (gather_rows(local_reconstruction.detach(), owned_blocks, group),
                      reconstruction.detach()),
        "input grad": (gather_rows(local_x.grad, owned_blocks, group), full_x.grad),
        "bias grad": (gather_rows(layer.bias.grad, owned_blocks, group, dim=1), reference.bias.grad),
    }
    banks = ["encoder"] + ([] if case[5] else ["decoder"])
    state = layer.state_dict()
    for bank in banks:
        mine, whole = getattr(layer, bank).layer.weight, getattr(reference, bank).layer.weight
        comparisons[f"{bank} weight"] = (gather_rows(mine.detach(), location_blocks, group, dim=0),
                                         whole.detach())
        comparisons[f"{bank} weight grad"] = (gather_rows(mine.grad, location_blocks, group, dim=0),
                                              whole.grad)
        comparisons[f"full_tensor {bank} weight"] = (state[f"{bank}.layer.weight"].full_tensor(),
                                                     whole.detach())
    comparisons["full_tensor bias"] = (state["bias"].full_tensor(), reference.bias.detach())
    worst = 0.0
    for what, (got, want) in comparisons.items():
        assert got.shape == want.shape, (name, what, got.shape, want.shape)
        difference = largest_difference(got, want)
        assert difference < 1e-5, f"{name}: {what} differs by {difference:.2e}"
        worst = max(worst, difference)
    return worst


def check_network(what, layers, shape, mesh, group):
    """The features of ``layers`` (each with its pooling and LCN) and their gradients: every
    step reads the previous one's output rows as its own input rows, so only halos (and
    LCN's per-image sums) move between them. Returns the largest difference and the split
    network."""
    network = build(layers, shape, 3)
    x = torch.randn(BATCH, *shape)
    full_x = x.clone().requires_grad_()
    expected = network.features(full_x)
    expected.pow(2).sum().backward()
    reference_grads = [layer.encoder.weight.grad.clone() for layer in network.layers]

    parted = build(layers, shape, 3, mesh)
    first = parted.layers[0]
    local_x = split_rows(x, first.owned_rows).clone().requires_grad_()
    local_y = parted.features(local_x)
    local_y.pow(2).sum().backward()
    got = gather_rows(local_y.detach(), parted.post[-1][-1].output_blocks, group)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    worst = largest_difference(got, expected.detach())
    for layer, want in zip(parted.layers, reference_grads):
        width = layer.out_width
        blocks = [(a * width, b * width) for a, b in layer.output_blocks]
        worst = max(worst, largest_difference(
            gather_rows(layer.encoder.layer.weight.grad, blocks, group, dim=0), want))
    grad_x = gather_rows(local_x.grad, first.input_blocks, group)
    worst = max(worst, largest_difference(grad_x, full_x.grad))
    assert worst < 1e-5, f"{what} differs by {worst:.2e}"
    return worst, parted


def check_stack(mesh, group):
    """Layer, L2 pooling, LCN, layer, L2 pooling (stride 2), LCN (Ni et al. 2015 and Le et al.
    2012)."""
    torch.manual_seed(1)
    layers = [LayerConfig(kind="local", maps=3, kernel=4, stride=2,
                          pool={"kind": "l2", "kernel": 3, "stride": 1}, lcn={"kernel": 5}),
              LayerConfig(kind="local", maps=2, kernel=3, stride=1,
                          pool={"kind": "l2", "kernel": 2, "stride": 2}, lcn={"kernel": 3})]
    worst, parted = check_network("stack", layers, (2, 34, 14), mesh, group)
    first, second = parted.layers
    (pool1, lcn1), (pool2, lcn2) = parted.post
    assert [b.owned_rows for b in pool1.blocks] == first.output_blocks
    assert [b.owned_rows for b in lcn1.blocks] == pool1.output_blocks
    assert second.input_blocks == lcn1.output_blocks
    assert [b.owned_rows for b in pool2.blocks] == second.output_blocks
    assert [b.owned_rows for b in lcn2.blocks] == pool2.output_blocks
    return worst


def check_max_and_average_pooling(mesh, group):
    """Layer, max pooling (stride 2), layer, average pooling (stride 1), LCN: both poolings
    are split by rows like L2 pooling (halo rows where windows cross block edges)."""
    torch.manual_seed(2)
    layers = [LayerConfig(kind="local", maps=3, kernel=3, stride=1,
                          pool={"kind": "max", "kernel": 3, "stride": 2}),
              LayerConfig(kind="local", maps=2, kernel=2, stride=1,
                          pool={"kind": "avg", "kernel": 2, "stride": 1}, lcn={"kernel": 3})]
    worst, _ = check_network("max/average pooling stack", layers, (2, 22, 9), mesh, group)
    return worst


def main():
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=60)
        mesh = build_mesh(1, env.world_size, env)["model"]
        group = mesh.get_group()
        for name, case in CASES.items():
            worst = check_case(name, case, mesh, group)
            print(f"rank {env.rank}: {name} ok ({worst:.1e})", flush=True)
        print(f"rank {env.rank}: stack ok ({check_stack(mesh, group):.1e})", flush=True)
        worst = check_max_and_average_pooling(mesh, group)
        print(f"rank {env.rank}: max/average pooling ok ({worst:.1e})", flush=True)
        if env.world_size == 4:
            # Data x model 2 x 2: halos travel inside each model group (global ranks {0, 1}
            # and {2, 3}), while the other group does the same.
            grid = build_mesh(2, 2, env)["model"]
            worst = check_case("overlap-k4-s2", CASES["overlap-k4-s2"], grid, grid.get_group())
            print(f"rank {env.rank}: 2x2 mesh ok ({worst:.1e})", flush=True)
        shutdown_distributed()
    print(f"rank {env.rank}: all cases ok", flush=True)


if __name__ == "__main__":
    main()
