"""Objectives compute the formulas they name; constraints hold after every step."""

import math

import pytest
import torch

from terabrain.config.schema import OptimizerConfig
from terabrain.nn.autoencoder import RICA, Autoencoder, SupervisedHead
from terabrain.objectives import (
    ClassificationObjective,
    ReconstructionObjective,
    RegressionObjective,
    RICAObjective,
    SparseAutoencoderObjective,
)
from terabrain.train.optim import build_optimizer

torch.manual_seed(0)


def _step(optimizer, objective, model, x):
    """One optimizer step through a closure, the way the trainer drives every optimizer."""
    def closure():
        optimizer.zero_grad()
        loss, _ = objective(model, x)
        loss.backward()
        return loss
    optimizer.step(closure)


def test_rica_loss_is_seed_000_equation_1():
    model = RICA(inputs=6, hidden=4)
    with torch.no_grad():
        model.alpha.fill_(0.7)
        model.bias.normal_()
    x = torch.randn(5, 6, dtype=torch.float32)
    lam, eps = 0.3, 0.01
    loss, parts = RICAObjective(lam, eps)(model, x)
    W, a, b = model.weight.detach(), 0.7, model.bias.detach()
    expected = 0.0
    for xi in x:
        h = a * (W @ xi)
        expected += ((W.T @ h + b - xi) ** 2).sum() + lam * torch.sqrt(h**2 + eps).sum()
    assert loss.item() == pytest.approx(expected.item() / len(x), rel=1e-5)
    assert set(parts) == {"reconstruction", "sparsity"}


@pytest.mark.parametrize("name", ["sgd", "adam", "lbfgs"])
def test_rica_rows_stay_unit_norm_after_every_step(name):
    model = RICA(inputs=16, hidden=8)
    objective = RICAObjective(0.1, 0.01)
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=0.1 if name != "lbfgs" else 1.0), model.parameters())
    x = torch.randn(64, 16)
    for _ in range(3):
        _step(optimizer, objective, model, x)
        objective.after_step(model)
        norms = model.weight.detach().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_sparse_autoencoder_kl_term():
    model = Autoencoder(5, 3, tied=False, activation="sigmoid")
    x = torch.rand(10, 5)
    rho, beta, wd = 0.1, 2.0, 0.01
    loss, parts = SparseAutoencoderObjective(rho, beta, wd)(model, x)
    codes, reconstruction = model(x)
    rho_hat = codes.mean(0)
    kl = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    decay = 0.5 * wd * (model.encoder.weight.pow(2).sum() + model.decoder.weight.pow(2).sum())
    error = 0.5 * (reconstruction - x).pow(2).sum(1).mean()
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx((error + beta * kl + decay).item(), rel=1e-5)


def test_kl_is_zero_when_mean_activation_equals_rho():
    model = Autoencoder(4, 3, activation="sigmoid")
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.fill_(math.log(0.05 / 0.95))  # sigmoid(bias) = 0.05
    _, parts = SparseAutoencoderObjective(0.05, 3.0, 0.0)(model, torch.rand(8, 4))
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_reconstruction_autoencoder_learns_identity_of_low_rank_data(tied):
    torch.manual_seed(1)
    basis = torch.randn(3, 12)
    x = torch.randn(256, 3) @ basis
    model = Autoencoder(12, 6, tied=tied, activation="identity")
    objective = ReconstructionObjective()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = objective(model, x)[0].item()
    for _ in range(400):
        optimizer.zero_grad()
        loss, _ = objective(model, x)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01 * first
    if tied:
        assert not hasattr(model, "decoder")


def test_supervised_objectives_on_a_head():
    features = Autoencoder(4, 8, activation="relu")
    model = SupervisedHead(features, hidden=8, outputs=3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loss, parts = ClassificationObjective()(model, x, y)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    assert 0.0 <= parts["accuracy"].item() <= 1.0
    regressor = SupervisedHead(features, hidden=8, outputs=1)
    target = torch.randn(32)
    loss, _ = RegressionObjective()(regressor, x, target)
    assert loss.item() == pytest.approx(((regressor(x).squeeze(1) - target) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    "config, kind",
    [
        (OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True), torch.optim.SGD),
        (OptimizerConfig(name="adagrad", lr=0.1), torch.optim.Adagrad),
        (OptimizerConfig(name="rmsprop", lr=0.01, momentum=0.5), torch.optim.RMSprop),
        (OptimizerConfig(name="adam", lr=0.01), torch.optim.Adam),
        (OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1), torch.optim.AdamW),
        (OptimizerConfig(name="lbfgs"), torch.optim.LBFGS),
    ],
)
def test_optimizers_come_from_torch_optim_and_lower_the_loss(config, kind):
    torch.manual_seed(2)
    model = Autoencoder(8, 4, activation="tanh")
    optimizer = build_optimizer(config, model.parameters())
    assert type(optimizer) is kind
    if config.name == "sgd":
        assert optimizer.param_groups[0]["nesterov"] is True
    x = torch.randn(64, 8)
    objective = ReconstructionObjective()
    first = objective(model, x)[0].item()
    for _ in range(20):
        _step(optimizer, objective, model, x)
    assert objective(model, x)[0].item() < first


def test_dropout_is_active_in_training_only():
    model = Autoencoder(100, 10, dropout=0.5)
    x = torch.ones(4, 100)
    model.train()
    assert not torch.equal(model.encode(x), model.encode(x))
    model.eval()
    assert torch.equal(model.encode(x), model.encode(x))


def test_a_fixed_rica_scale_is_the_tight_frame_scale_and_never_moves():
    over, under = RICA(8, 32, seed=1, learn_scale=False), RICA(8, 4, seed=1, learn_scale=False)
    assert over.alpha.item() == pytest.approx(0.25) and under.alpha.item() == 1.0
    assert not over.alpha.requires_grad
    objective, x = RICAObjective(0.1, 0.01), torch.randn(64, 8)
    optimizer = build_optimizer(OptimizerConfig(name="lbfgs", lr=1.0, max_iter=5),
                                [p for p in over.parameters() if p.requires_grad])
    before = over.weight.detach().clone()
    _step(optimizer, objective, over, x)
    assert over.alpha.item() == pytest.approx(0.25) and over.alpha.grad is None
    assert not torch.equal(over.weight.detach(), before)


def _ica_recovery(learn_scale: bool) -> float:
    """RICA 40x overcomplete on rotated Laplacian sources, 4 L-BFGS steps: the median over
    filters of the largest |cosine| with a source axis (1 = every filter is a source)."""
    inputs, hidden = 8, 320
    generator = torch.Generator().manual_seed(0)
    sources = torch.distributions.Laplace(0.0, 1.0).sample((2000, inputs))
    mixing = torch.linalg.qr(torch.randn(inputs, inputs, generator=generator))[0]
    model = RICA(inputs, hidden, seed=1, learn_scale=learn_scale)
    objective, x = RICAObjective(1.0, 1e-5), sources @ mixing.T
    optimizer = build_optimizer(
        OptimizerConfig(name="lbfgs", lr=1.0, max_iter=25, history_size=20, line_search="strong_wolfe"),
        [p for p in model.parameters() if p.requires_grad])
    for _ in range(4):
        _step(optimizer, objective, model, x)
        objective.after_step(model)
    in_sources = model.weight.detach() @ mixing  # unit rows in the sources' coordinates
    return in_sources.abs().max(dim=1).values.median().item()


def test_a_fixed_scale_lets_lbfgs_train_a_very_overcomplete_rica():
    # Learned, alpha's curvature (~|W^T W x|^2, 40x overcomplete) dominates L-BFGS's scaling
    # and the filters stay part-way; fixed at inputs / hidden they find the sources' axes.
    fixed, learned = _ica_recovery(False), _ica_recovery(True)
    assert fixed > 0.99
    assert learned < fixed - 0.03


@pytest.mark.parametrize("name, fused", [("sgd", True), ("adam", True), ("adamw", True),
                                         ("adagrad", True), ("rmsprop", False), ("lbfgs", False)])
def test_optimizers_use_torchs_fused_kernels_where_there_are_any(name, fused):
    model = Autoencoder(8, 4)
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=0.01), model.parameters())
    assert bool(optimizer.defaults.get("fused")) is fused


def test_fused_sgd_updates_bit_for_bit_as_the_loop_does():
    """Fused SGD replaces torch.optim's loop without changing a bit of any weight."""
    torch.manual_seed(3)
    start = torch.randn(300, 70)
    gradients = [torch.randn(300, 70) for _ in range(6)]
    config = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    fused = torch.nn.Parameter(start.clone())
    loop = torch.nn.Parameter(start.clone())
    built = build_optimizer(config, [fused])
    plain = torch.optim.SGD([loop], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                            foreach=False)
    for gradient in gradients:
        fused.grad, loop.grad = gradient.clone(), gradient.clone()
        built.step()
        plain.step()
    assert built.defaults["fused"] and not plain.defaults.get("fused")
    assert torch.equal(fused, loop)
    assert not torch.equal(fused, start)


def test_fused_kernels_are_left_out_where_dtensor_has_no_rule_for_them(tmp_path):
    """SGD and Adagrad over sharded (DTensor) parameters keep the loop and still step; Adam
    has a sharding rule for its fused kernel, but not for a mix of DTensors and tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from terabrain.train.optim import fused_kernels_apply

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for name, fused in (("sgd", False), ("adagrad", False), ("adam", True), ("adamw", True)):
            plain = torch.nn.Parameter(torch.ones(4, 3))
            sharded = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
            assert fused_kernels_apply(name, [plain])
            assert fused_kernels_apply(name, [sharded]) is fused
            assert not fused_kernels_apply(name, [plain, sharded])
            for group in ([plain], [sharded], [plain, sharded]):
                optimizer = build_optimizer(OptimizerConfig(name=name, lr=0.1), group)
                plain.grad = torch.ones(4, 3)
                sharded.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
                optimizer.step()
            # plain stepped twice, sharded twice: the same updates whichever kernel ran
            assert torch.equal(sharded.full_tensor(), plain.detach()), name
            assert not torch.equal(plain.detach(), torch.ones(4, 3))
    finally:
        dist.destroy_process_group()
    assert not fused_kernels_apply("sgd", [torch.zeros(2, dtype=torch.int64)])
