"""`terabrain plan`: parameter counts of the LBANN autoencoders (Van Essen et al. 2015) without allocating
them, memory per rank and bytes sent per step for each (data, model) split, the CLI, and the
small LBANN variant actually training.

The full-size experiments are only ever planned (meta device), never built."""

import json
import math

import pytest
import torch

from terabrain.cli import main
from terabrain.config.loader import builtin_names, load_experiment
from terabrain.errors import ConfigError
from terabrain.learners.registry import build_model
from terabrain.capacity import format_plan, parse_memory, plan_experiment
from terabrain.capacity.costs import FP32
from terabrain.learners.registry import learner_of


def data_shape(data):
    """(inputs per example, training rows) from the data source table."""
    from terabrain.data.sources import source_of

    source = source_of(data)
    return math.prod(source.example_shape(data)), source.training_rows(data)


def parameters_of(config, inputs):
    return learner_of(config).parameters_of(config, inputs)

GB = 10**9
LBANN = {"lbann-ae-50k": 9.8e9, "lbann-ae-100k": 19.7e9, "lbann-ae-400k": 78.6e9}


def split(plan, data, model):
    return next(s for s in plan.splits if (s.data, s.model) == (data, model))


# --- parameter counts -----------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", sorted(LBANN.items()))
def test_lbann_parameter_counts_match_the_seed_within_one_percent(name, expected):
    config = load_experiment(name)
    assert data_shape(config.data)[0] == 256 * 256 * 3 == 196_608
    plan = plan_experiment(config, 8, 80 * GB)
    assert abs(plan.parameters - expected) / expected < 0.01
    # tied: one 196,608 x X matrix plus the two biases
    hidden = config.model.hidden
    assert plan.parameters == 196_608 * hidden + hidden + 196_608


def test_planning_never_allocates_the_model():
    params = parameters_of(load_experiment("lbann-ae-400k"), 196_608)
    assert sum(p.numel for p in params) > 78e9  # 315 GB of fp32 if it were real


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("lbann-ae-small", []),
        ("lbann-ae-small", ["model.tied=false", "model.hidden=96"]),
        ("natural-patches-rica", []),
        ("digits-sae", []),
    ],
)
def test_planner_counts_equal_the_real_model(name, overrides):
    config = load_experiment(name, overrides)
    inputs, _ = data_shape(config.data)
    real = build_model(config.model, inputs)
    planned = parameters_of(config, inputs)
    assert {p.name: p.numel for p in planned} == {n: p.numel() for n, p in real.named_parameters()}
    plan = plan_experiment(config, 1, 80 * GB)
    assert plan.parameters == sum(p.numel() for p in real.parameters())


# --- memory per rank ------------------------------------------------------------------------


def test_weight_bytes_shrink_by_the_model_axis_factor():
    plan = plan_experiment(load_experiment("lbann-ae-50k"), 8, 80 * GB)
    replicated = FP32 * 196_608  # the decoder bias; W and the encoder bias are sharded
    sharded = FP32 * (196_608 * 50_000 + 50_000)
    for model in (1, 2, 4, 8):
        s = split(plan, 8 // model, model)
        assert s.weights == sharded // model + replicated
        assert s.local_parameters * FP32 == s.weights
    one, eight = split(plan, 8, 1), split(plan, 1, 8)
    assert (one.weights - replicated) == 8 * (eight.weights - replicated)
    # One gradient buffer per parameter (the tied W too): gradients shrink like weights.
    assert one.gradients == one.weights and eight.gradients == eight.weights


def test_optimizer_state_per_optimizer():
    config = load_experiment("lbann-ae-50k")
    def state(*overrides, data=1, model=8):
        plan = plan_experiment(load_experiment("lbann-ae-50k", list(overrides)), 8, 80 * GB)
        s = split(plan, data, model)
        return s.optimizer / s.weights
    assert config.optimizer.momentum == 0 and state() == 0
    assert state("optimizer.momentum=0.9") == 1
    # State, plus what an unfused update allocates: a square root the size of the largest
    # parameter (here W: all but 0.4% of the weights; Adam divides it into a second one).
    # Fused updates (Adam and AdamW also over DTensors, SGD and Adagrad only over plain
    # tensors: terabrain.capacity.costs.fused_update) allocate nothing.
    assert state("optimizer.name=adam") == pytest.approx(2, rel=1e-6)
    assert state("optimizer.name=rmsprop", "optimizer.momentum=0.9") == pytest.approx(3, rel=1e-2)
    assert state("optimizer.name=adagrad") == pytest.approx(1 + 1, rel=1e-2)  # over DTensors
    assert state("optimizer.name=adagrad", data=8, model=1) == pytest.approx(1, rel=1e-6)
    # L-BFGS: 2 * history + 3 flat vectors over ALL parameters, replicated on every rank,
    # + 3 more and a copy of the local weights in a strong-Wolfe line search.
    plan = plan_experiment(
        load_experiment("lbann-ae-50k", ["optimizer.name=lbfgs", "optimizer.history_size=10",
                                         "optimizer.line_search=none"]), 8, 80 * GB)
    assert split(plan, 1, 8).optimizer == 23 * FP32 * plan.parameters
    assert split(plan, 8, 1).optimizer == 23 * FP32 * plan.parameters  # not shrunk by model


def test_infeasible_splits_are_marked_and_the_fitting_one_recommended():
    plan = plan_experiment(load_experiment("lbann-ae-50k"), 8, parse_memory("80GB"))
    fits = {(s.data, s.model): s.fits for s in plan.splits}
    # 4 x 2 fits since the tied W's gradient is one buffer (39 GB weights + 39 GB gradient).
    assert fits == {(8, 1): False, (4, 2): True, (2, 4): True, (1, 8): True}
    assert all(s.total > 0.9 * 80 * GB for s in plan.splits if not s.fits)
    assert (plan.recommended.data, plan.recommended.model) == (1, 8)
    assert split(plan, 1, 8).configured  # parallel.model 8 of lbann-ae-50k

    nothing = plan_experiment(load_experiment("lbann-ae-400k"), 8, 80 * GB)
    assert not any(s.fits for s in nothing.splits) and nothing.recommended is None
    assert "no split fits" in format_plan(nothing)
    assert plan_experiment(load_experiment("lbann-ae-400k"), 64, 80 * GB).recommended is not None

    # 3 devices: 3 divides neither hidden (50,000) nor the batch (40).
    odd = plan_experiment(load_experiment("lbann-ae-50k"), 3, 80 * GB)
    assert [s.status for s in odd.splits] == [
        "no: data does not divide batch (40)", "no: model does not divide hidden (50000)"]
    assert odd.recommended is None


# --- bytes sent per step --------------------------------------------------------------------

TINY = ["data.patch_size=4", "data.color=false", "model.hidden=8", "train.batch_size=6"]


def test_bytes_sent_for_a_hand_computed_case():
    # n = 4 x 4 = 16 inputs, h = 8, tied: W 8 x 16 = 128 and encoder bias 8 sharded,
    # decoder bias 16 replicated; batch 6 on 4 devices, SGD (one closure per step).
    plan = plan_experiment(load_experiment("lbann-ae-small", TINY), 4, GB)
    assert plan.parameters == 152
    # data 2 x model 2: 3 rows per rank; local = 128/2 + 8/2 + 16 = 84 parameters.
    s = split(plan, 2, 2)
    assert s.local_parameters == 84
    # model axis: 1 all-reduce of the 3 x 16 fp32 reconstruction (made whole as it leaves the
    # model), ring 2(m-1)/m = 1: 192 B; no weight decay, so no sum over hidden units.
    assert s.model_axis_sent == 3 * 16 * 4 == 192
    # data axis: local gradients + 3 logged values, ring 2(d-1)/d = 1: (84 + 3) * 4 B.
    assert s.data_axis_sent == (84 + 3) * 4 == 348
    assert s.sent == 192 + 348
    # data 1 x model 4: 6 rows; ring factor 2 * 3/4 = 1.5.
    s = split(plan, 1, 4)
    assert s.model_axis_sent == 1.5 * (6 * 16 * 4) == 576
    assert s.data_axis_sent == 0
    # data 4 x model 1 cannot split a batch of 6 four ways.
    assert split(plan, 4, 1).status == "no: data does not divide batch (6)"
    # with L-BFGS: max_iter + 1 closure evaluations, each also all-gathering the sharded
    # gradient (136 elements) into L-BFGS's replicated flat vector: (m-1)/m * 136 * 4 B.
    lbfgs = plan_experiment(load_experiment(
        "lbann-ae-small", TINY + ["optimizer.name=lbfgs", "optimizer.max_iter=4",
                                  "optimizer.momentum=0"]), 4, GB)
    assert lbfgs.evaluations_per_step == 5
    assert split(lbfgs, 2, 2).model_axis_sent == 5 * (192 + 136 * 4 / 2)


class _Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the collectives DTensor issues, as (name, elements of the input)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor lower to local ops and collectives first
        name = str(func)
        if "c10d" in name and ("all_reduce" in name or "all_gather" in name):
            self.calls.append((name, args[0].numel()))
        return func(*args, **(kwargs or {}))

    def bytes_sent(self, ranks):
        sent = 0.0
        for name, elements in self.calls:
            factor = 2 * (ranks - 1) / ranks if "all_reduce" in name else ranks - 1
            sent += factor * FP32 * elements
        return sent


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # tied autoencoder, reconstruction
        ["model.tied=false", "objective.kind=sparse_autoencoder", "objective.weight_decay=0.001"],
        ["model.kind=rica", "objective.kind=rica", "data.remove_mean=true"],
        ["optimizer.name=lbfgs", "optimizer.max_iter=3", "optimizer.momentum=0"],
    ],
    ids=["tied", "untied-sae", "rica", "tied-lbfgs"],
)
def test_model_axis_bytes_match_the_collectives_dtensor_issues(overrides):
    """Run a real optimizer step of a model sharded over 4 (fake) ranks and add up the ring
    traffic of every collective DTensor issues; the planner must predict exactly that."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from terabrain.objectives import build_objective
    from terabrain.parallel.hidden_unit_plan import apply_hidden_unit_plan
    from terabrain.train.optim import build_optimizer

    config = load_experiment("lbann-ae-small", TINY + overrides)
    plan = plan_experiment(config, 4, GB)
    expected = split(plan, 1, 4).model_axis_sent
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        torch.manual_seed(0)
        model = apply_hidden_unit_plan(build_model(config.model, plan.inputs), mesh)
        objective = build_objective(config.objective)
        optimizer = build_optimizer(config.optimizer, model.parameters())
        x = DTensor.from_local(torch.rand(plan.batch, plan.inputs), mesh, [Replicate()],
                               run_check=False)
        evaluations = 0

        def closure():
            nonlocal evaluations
            evaluations += 1
            optimizer.zero_grad(set_to_none=True)
            loss, _ = objective(model, x)
            loss.backward()
            return loss

        recorder = _Collectives()
        with recorder:
            optimizer.step(closure)
    finally:
        dist.destroy_process_group()
    per_evaluation = expected / plan.evaluations_per_step
    assert recorder.bytes_sent(4) == pytest.approx(evaluations * per_evaluation, rel=1e-9)


def test_memory_estimate_bounds_the_measured_peak():
    """The planned total (less the training set, kept outside the step) is at least the peak
    that MemTracker measures over real optimizer steps on one rank, and within 20% of it."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from terabrain.objectives import build_objective
    from terabrain.train.optim import build_optimizer

    cases = [
        ["model.hidden=256"],  # weights dominate
        ["model.hidden=256", "model.tied=false", "optimizer.name=adam"],
        ["model.hidden=256", "model.kind=rica", "objective.kind=rica"],
        ["model.hidden=32", "train.batch_size=400"],  # activations dominate
    ]
    for overrides in cases:
        config = load_experiment("lbann-ae-small", overrides)
        plan = plan_experiment(config, 1, 1000 * GB)
        planned = plan.splits[0].total - plan.splits[0].dataset
        torch.manual_seed(0)
        model = build_model(config.model, plan.inputs)
        objective = build_objective(config.objective)
        optimizer = build_optimizer(config.optimizer, model.parameters())
        data = torch.rand(plan.batch, plan.inputs)
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                tracker.reset_mod_stats()
                x = data[torch.arange(plan.batch)]
                optimizer.zero_grad(set_to_none=True)
                loss, _ = objective(model, x)
                loss.backward()
                optimizer.step()
        peak = tracker.get_tracker_snapshot("peak")
        measured = sum(stats["Total"] for stats in peak.values())
        assert measured <= planned <= 1.2 * measured, (overrides, measured, planned)


# --- memory sizes and the CLI ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("512MB", 512 * 10**6), ("1.5TB", 1.5e12),
     ("16 gib", 16 * 2**30), ("4096B", 4096)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80", "80XB", "eighty GB", "-5GB", "0GB", ""])
def test_parse_memory_rejects_bad_sizes_naming_the_option(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


def test_cli_plan_prints_the_count_then_the_table(cli):
    result = cli("plan", "lbann-ae-50k", "--gpus", "8", "--gpu-memory", "80GB")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("9.83 B parameters")
    assert any(line.split()[:2] == ["1", "8"] and "<- recommended" in line for line in lines)


def test_cli_plan_json_and_overrides(capsys):
    assert main(["plan", "lbann-ae-50k", "--gpus", "16", "--gpu-memory", "40GiB",
                 "--set", "model.hidden=100000", "--batch", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"] == 196_608 * 100_000 + 100_000 + 196_608
    assert plan["batch"] == 64 and plan["device_memory"] == 40 * 2**30
    assert len(plan["splits"]) == 5 and plan["recommended"] is not None


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--gpus", "8", "--gpu-memory", "80"], "--gpu-memory"),
        (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory"),
        (["--gpus", "0", "--gpu-memory", "80GB"], "--gpus"),
        (["--gpus", "8", "--gpu-memory", "80GB", "--batch", "0"], "--batch"),
        (["--gpus", "8", "--gpu-memory", "80GB", "--set", "model.hidden=-1"], "model.hidden"),
    ],
)
def test_cli_plan_bad_input_exits_2_with_one_line(capsys, args, expected):
    assert main(["plan", "lbann-ae-50k", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terabrain: error:") and expected in lines[0]


# --- the built-ins --------------------------------------------------------------------------


def test_every_builtin_validates_and_plans():
    names = builtin_names()
    assert {"lbann-ae-50k", "lbann-ae-100k", "lbann-ae-400k", "lbann-ae-small"} <= set(names)
    for name in names:
        config = load_experiment(name)
        assert config.name == name and config.description and "\n" not in config.description
        assert plan_experiment(config, 8, 80 * GB).splits


def test_lbann_small_trains_and_its_loss_falls(tmp_path):
    from terabrain.train.run import run_experiment

    config = load_experiment("lbann-ae-small", [
        "train.steps=20", "train.log_every=1", "train.checkpoint_every=0",
        "train.progress=false", "data.num_patches=200", "data.holdout_patches=20",
    ])
    run_experiment(config, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses
