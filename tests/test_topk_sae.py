"""The TopK sparse autoencoder (model.kind topk_sae): its exact top-k, training on sparse
synthetic data, AuxK against dead latents, the unit-norm decoder, BatchTopK's threshold,
the data-dependent start, and on 2 and 4 real gloo ranks the sharded top-k and training."""

import pytest
import torch
from conftest import SCRIPTS, torchrun

from terabrain.learners.registry import LEARNERS
from terabrain.learners.topk_sae import TopKSAEObjective, geometric_median
from terabrain.nn.topk_sae import TopKSAE, ordered_topk

TRUE_DIRECTIONS = torch.nn.functional.normalize(
    torch.randn(24, 16, generator=torch.Generator().manual_seed(3)), dim=1)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only waits for its share of a shared
    2-core machine (measured: a 128x16x32 matmul 40 ms with 2 threads under load, 5 us with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_rows(rows: int, generator: torch.Generator, active: int = 3) -> torch.Tensor:
    """Rows that are sums of ``active`` of 24 fixed unit directions with positive weights."""
    codes = torch.zeros(rows, len(TRUE_DIRECTIONS))
    chosen = torch.rand(rows, len(TRUE_DIRECTIONS), generator=generator).argsort(1)[:, :active]
    codes.scatter_(1, chosen, torch.rand(rows, active, generator=generator) + 0.5)
    return codes @ TRUE_DIRECTIONS


def train(model, objective, steps, lr=3e-3, seed=1):
    optimizer = torch.optim.Adam(
        [model.encoder, model.encoder_bias, model.decoder, model.pre_bias], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, parts = objective(model, sparse_rows(128, generator))
        loss.backward()
        optimizer.step()
        objective.after_step(model)
        history.append({name: float(value) for name, value in parts.items()})
    return history


# --- the exact top-k ------------------------------------------------------------------------


def test_ties_go_to_the_lower_index():
    values, positions, mask = ordered_topk(torch.tensor([[1.0, 3, 3, 2, 3]]), 2)
    assert positions.tolist() == [[1, 2]] and values.tolist() == [[3.0, 3.0]]
    assert mask.tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("seed", range(40))
def test_ordered_topk_is_the_stable_descending_sort(seed):
    generator = torch.Generator().manual_seed(seed)
    rows, width = (int(v) for v in torch.randint(1, 21, (2,), generator=generator))
    scores = torch.randint(-2, 3, (rows, width), generator=generator).float()
    k = int(torch.randint(1, width + 1, (), generator=generator))
    values, positions, mask = ordered_topk(scores, k)
    expected = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(positions, expected.indices[:, :k])
    assert torch.equal(values, expected.values[:, :k])
    assert mask.sum(dim=1).tolist() == [k] * rows


# --- the model --------------------------------------------------------------------------------


def test_loss_falls_on_sparse_synthetic_data_with_k_latents_active():
    torch.manual_seed(0)
    model = TopKSAE(16, 32, 3, "topk", k_aux=8, seed=0)
    history = train(model, TopKSAEObjective(50, 1 / 32, 0.0), 100)
    first, last = history[0], history[-1]
    assert last["fvu"] < 0.5 * first["fvu"], (first, last)
    assert last["reconstruction"] < 0.5 * first["reconstruction"]
    assert all(h["l0"] <= 3 for h in history)


def test_auxk_revives_dead_latents():
    """Half the latents start with encoder rows 20x too short to win a top-k: without AuxK
    they stay dead; with it their decoder and encoder rows learn the residual and fire."""
    dead = {}
    for coefficient in (0.0, 1.0):
        torch.manual_seed(0)
        model = TopKSAE(16, 32, 3, "topk", k_aux=8, seed=0)
        with torch.no_grad():
            model.encoder[16:] *= 0.05
        history = train(model, TopKSAEObjective(5, coefficient, 0.0), 150)
        dead[coefficient] = history[-1]["dead_fraction"]
    assert dead[0.0] >= 0.3
    assert dead[1.0] <= 0.5 * dead[0.0], dead


def test_decoder_rows_stay_unit_norm_and_their_gradient_is_tangent():
    torch.manual_seed(0)
    model = TopKSAE(16, 32, 3, "topk", seed=0)
    objective = TopKSAEObjective(1, 0.5, 0.0)
    train(model, objective, 5, lr=0.05)
    model.decoder.grad = None
    assert torch.allclose(model.decoder.norm(dim=1), torch.ones(32), atol=1e-5)
    loss, _ = objective(model, sparse_rows(64, torch.Generator().manual_seed(9)))
    loss.backward()
    along = (model.decoder.grad * model.decoder).sum(dim=1)
    assert along.abs().max() < 1e-5 * model.decoder.grad.norm()
    assert model.decoder.grad.abs().max() > 0


def test_encoder_starts_as_the_decoders_transpose():
    model = TopKSAE(16, 32, 3, seed=4)
    assert torch.equal(model.encoder, model.decoder)  # both (latents, inputs): W_enc = W_dec^T
    assert torch.allclose(model.decoder.norm(dim=1), torch.ones(32))


def test_batchtopk_keeps_k_per_example_on_average_and_thresholds_at_inference():
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 4, "batchtopk", seed=0)
    history = train(model, TopKSAEObjective(50, 1 / 32, 0.0), 150)
    assert all(abs(h["l0"] - 4) < 1e-6 for h in history)  # k x batch over the batch
    assert model.threshold > 0
    model.eval()
    with torch.no_grad():
        codes = model.encode(sparse_rows(512, torch.Generator().manual_seed(5)))
    assert 2 <= (codes > 0).sum(dim=1).float().mean() <= 8
    assert ((codes == 0) | (codes > model.threshold)).all()


def test_relu_variant_is_sparsified_by_l1():
    l0 = {}
    for coefficient in (0.0, 1.0):
        torch.manual_seed(0)
        model = TopKSAE(16, 32, 3, "relu", seed=0)
        l0[coefficient] = train(model, TopKSAEObjective(50, 0.0, coefficient), 150)[-1]["l0"]
    assert l0[1.0] < 0.5 * l0[0.0], l0


def test_geometric_median_resists_an_outlier_that_moves_the_mean():
    points = torch.cat([torch.randn(99, 3, generator=torch.Generator().manual_seed(0)) * 0.1,
                        torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 0.1 < points.mean(dim=0).norm()


def test_fit_to_data_normalises_the_input_and_starts_b_dec_at_the_median():
    learner = LEARNERS["topk_sae"]
    from terabrain.config.schema import ExperimentConfig

    config = ExperimentConfig.model_validate({
        "model": {"kind": "topk_sae", "hidden": 32, "k": 3},
        "objective": {"kind": "reconstruction"}, "optimizer": {"name": "adam"},
        "train": {"batch_size": 64},
    })
    sample = sparse_rows(2000, torch.Generator().manual_seed(2)) * 7 + 3
    model = learner.build(config, (16,), 0)
    fitted = learner.fit_to_data(config, model, sample)
    normalised = model.normalize(sample)
    assert normalised.pow(2).sum(dim=1).mean() == pytest.approx(16, rel=1e-4)
    assert torch.allclose(model.pre_bias, geometric_median(normalised), atol=1e-3)
    assert fitted["input_scale"] == pytest.approx(float(model.input_scale))
    variance = (normalised - normalised.mean(0)).pow(2).sum(1).mean()
    assert float(model.data_variance) == pytest.approx(float(variance), rel=1e-4)


@pytest.mark.parametrize("overrides, field", [
    ({"model": {"kind": "topk_sae", "hidden": 8, "k": 9}}, "model.k"),
    ({"model": {"kind": "topk_sae"}, "optimizer": {"name": "lbfgs"}}, "optimizer.name"),
    ({"model": {"kind": "topk_sae"}, "train": {"batch_size": None}}, "train.batch_size"),
    ({"model": {"kind": "topk_sae"}, "objective": {"kind": "reconstruction",
                                                   "weight_decay": 0.1}}, "objective.weight_decay"),
])
def test_wrong_settings_name_the_field(overrides, field):
    from pydantic import ValidationError

    from terabrain.config.schema import ExperimentConfig

    raw = {"objective": {"kind": "reconstruction"}, "optimizer": {"name": "adam"},
           "train": {"batch_size": 64}, **overrides}
    with pytest.raises(ValidationError, match=field):
        ExperimentConfig.model_validate(raw)


# --- several real ranks -----------------------------------------------------------------------


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_topk_equals_one_process_including_ties(nproc):
    result = _ok(torchrun(nproc, str(SCRIPTS / "sae_ranks.py"), "topk"))
    for rank in range(nproc):
        assert f"rank {rank}: topk ok (60 cases)" in result.stdout


@pytest.mark.parametrize("nproc, shape", [(2, "1x2"), (4, "2x2")])
def test_sharded_training_matches_one_process(nproc, shape):
    result = _ok(torchrun(nproc, str(SCRIPTS / "sae_ranks.py"), "train", shape))
    for rank in range(nproc):
        assert f"rank {rank}: topk ok" in result.stdout
        assert f"rank {rank}: topk-all-dead ok" in result.stdout
        assert f"rank {rank}: relu-l1 ok" in result.stdout
        assert f"rank {rank}: train ok" in result.stdout


def _activations_config(tmp_path):
    import numpy as np

    np.save(tmp_path / "acts.npy", sparse_rows(3000, torch.Generator().manual_seed(0)).numpy())
    (tmp_path / "sae.yaml").write_text(TINY_SAE.format(path=tmp_path / "acts.npy"))
    return [str(tmp_path / "sae.yaml")]


TINY_SAE = """
name: tiny-sae
data: {{source: npy, path: {path}, remove_mean: false, whitening: none, test_fraction: 0.1}}
model: {{kind: topk_sae, hidden: 128, k: 3, k_aux: 8, dead_after: 128, aux_coefficient: 0.5}}
objective: {{kind: reconstruction}}
optimizer: {{name: adam, lr: 0.01}}
train: {{steps: 6, batch_size: 64, checkpoint_every: 2, progress: false}}
"""


def _losses(run):
    import json

    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_2x2_checkpoint_resumes_on_2_ranks_then_1_as_if_never_stopped(tmp_path):
    """Latents across 2 model ranks x 2 data replicas for 2 steps, resumed on a 1x2 mesh, then
    on one process: the losses (AuxK active: latents die after 2 steps) and the final
    weights, the dead-latent counters included, equal one uninterrupted process's."""
    from conftest import run_cli
    from safetensors.torch import load_file

    config = _activations_config(tmp_path)
    reference, run = tmp_path / "reference", tmp_path / "run"
    _ok(run_cli("train", *config, "--out", str(reference), "--set", "train.steps=6"))
    _ok(torchrun(4, "-m", "terabrain", "train", *config, "--out", str(run), "--set",
                 "train.steps=2", "--set", "parallel.model=2", "--set", "parallel.data=2"))
    (run / "results.json").unlink()  # as if stopped before the stage finished
    resumed = _ok(torchrun(2, "-m", "terabrain", "train", "--resume", str(run), "--set",
                           "train.steps=4", "--set", "parallel.model=2", "--set", "parallel.data=1"))
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    (run / "results.json").unlink()
    resumed = _ok(run_cli("train", "--resume", str(run), "--set", "train.steps=6",
                          "--set", "parallel.model=1"))
    assert "(step 4)" in resumed.stdout
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    expected = load_file(str(reference / "model.safetensors"))
    assert expected["steps_since_fired"].max() >= 2  # some latents went dead
    for name, value in load_file(str(run / "model.safetensors")).items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("hidden, batch, width, activation, aux", [
    (4096, 256, 256, "topk", 0.03),  # the backward pass's moment is the peak
    (8192, 512, 128, "topk", 0.0),  # the end of the forward pass is
    (8192, 512, 128, "batchtopk", 0.03),
    (8192, 512, 128, "relu", 0.0),
    (1024, 64, 512, "topk", 0.03),  # the optimizer step's moment is
])
def test_planned_memory_bounds_the_measured_peak(tmp_path, hidden, batch, width, activation, aux):
    """`terabrain plan`'s total for a topk_sae (less the training set) is at least the peak
    MemTracker measures over real Adam steps on one rank, and within 20% of it."""
    import numpy as np

    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from terabrain.capacity import plan_experiment
    from terabrain.config.loader import load_experiment
    from terabrain.learners.registry import learner_of
    from terabrain.parallel.parallelism import Parallelism
    from terabrain.train.optim import build_optimizer

    np.save(tmp_path / "acts.npy", np.zeros((4 * batch, width), np.float32))  # > one batch
    (tmp_path / "sae.yaml").write_text(f"""
name: memory
data: {{source: npy, path: {tmp_path / 'acts.npy'}, remove_mean: false, whitening: none}}
model: {{kind: topk_sae, hidden: {hidden}, k: 16, k_aux: 128, dead_after: 128,
        aux_coefficient: {aux}, activation: {activation}, l1_coefficient: 0.001}}
objective: {{kind: reconstruction}}
optimizer: {{name: adam, lr: 0.001}}
train: {{batch_size: {batch}}}
""")
    config = load_experiment(str(tmp_path / "sae.yaml"), [])
    split = plan_experiment(config, 1, 10**15).splits[0]
    planned = split.total - split.dataset
    learner = learner_of(config)
    torch.manual_seed(0)
    model = learner.build(config, (width,), 0)
    training = learner.training(config, model, Parallelism(None), (width,))
    optimizer = build_optimizer(config.optimizer, training.parameters)
    # MemTracker hooks every parameter's gradient; the learner's counters (never optimised,
    # scalars and one value per latent) take no gradient otherwise.
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    data = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
    tracker = mem_tracker.MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(2):
            tracker.reset_mod_stats()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = training.objective(model, data)
            loss.backward()
            optimizer.step()
    measured = sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
    assert measured <= planned <= 1.2 * measured, (measured, planned)
