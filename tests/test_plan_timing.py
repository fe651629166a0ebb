"""`terabrain plan --profile`: machine profiles, the step-time model and the recommendation
(terabrain.capacity.profile, .timing, .work; the learners' work counts)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from terabrain.capacity.planner import plan_experiment
from terabrain.capacity.profile import MachineProfile, builtin_profiles, load_profile, numeric_fields
from terabrain.capacity.timing import gemm_rate, predict, roofline
from terabrain.capacity.work import Gemm, StepWork, Transfer
from terabrain.cli import main
from terabrain.config.loader import load_experiment
from terabrain.errors import ConfigError

BUILTIN = {"h100-sxm", "h200", "a100-80gb", "llnl-edge", "llnl-catalyst", "cots-hpc"}


def test_every_builtin_profile_loads_and_names_a_source_for_each_number():
    assert BUILTIN <= set(builtin_profiles())
    for name in builtin_profiles():
        profile = load_profile(name)
        missing = [path for path in numeric_fields(profile)
                   if not any(path == key or path.startswith(key + ".") for key in profile.sources)]
        assert not missing, f"{name}: no source for {missing}"
        assumed = [text for text in profile.sources.values() if "assumption" in text]
        cited = [text for text in profile.sources.values() if "assumption" not in text]
        assert cited, f"{name} cites nothing"
        assert assumed, f"{name} states no assumption"


def test_thin_gemm_at_batch_40_is_memory_bound_and_a_square_one_is_not():
    h100 = load_profile("h100-sxm")
    thin = roofline(h100, 40, 6250, 196_608)  # lbann-ae-400k on 64 ranks: (b x h/m x n)
    square = roofline(h100, 8192, 8192, 8192)
    assert square == h100.compute.peak_flops
    # ~ 20 FLOP per fp32 byte (2 x 40 / 4): just under the H100's 67 TFLOPS / 3.35 TB/s...
    assert thin < h100.compute.peak_flops
    # ... and in bf16, 40 FLOP per byte against 989 TFLOPS / 3.35 TB/s: far below the peak.
    assert roofline(h100, 40, 6250, 196_608, bf16=True) < 0.2 * h100.compute.peak_flops_bf16


def test_measured_points_decide_the_rate_near_them(tmp_path):
    raw = yaml.safe_load(load_profile("h100-sxm").to_yaml())
    raw["compute"]["gemm_points"] = [
        {"m": 40, "n": 4096, "k": 4096, "flops_per_s": 1e12},
        {"m": 4096, "n": 4096, "k": 4096, "flops_per_s": 5e13},
    ]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    profile = load_profile(str(path))
    assert gemm_rate(profile, 40, 4096, 4096) == pytest.approx(1e12, rel=1e-3)
    assert gemm_rate(profile, 4096, 4096, 4096) == pytest.approx(5e13, rel=1e-3)
    between = gemm_rate(profile, 40, 4000, 4100)
    assert between < 0.1 * gemm_rate(profile, 4000, 4000, 4100)


def test_a_wrong_profile_field_is_named(tmp_path):
    raw = yaml.safe_load(load_profile("a100-80gb").to_yaml())
    raw["network"]["inter_node"]["all_reduce"]["bandwidth"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="network.inter_node.all_reduce.bandwidth"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="built-in: .*h100-sxm"):
        load_profile("no-such-machine")
    # An infinite figure is named too, not left to divide by zero in the step-time model.
    for field in ("step_overhead_s", "sharded_evaluation_s"):
        raw = yaml.safe_load(load_profile("a100-80gb").to_yaml())
        raw["compute"][field] = float("inf")
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=f"compute.{field}"):
            load_profile(str(path))


@pytest.mark.parametrize("content, message", [
    (b"\x00\xe0\xff binary", "not a text (UTF-8) file"),
    (b"name: a\nname: b\n", "duplicate key 'name'"),
    (b"a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "aliases are expanded"),
    (b"", "expected a mapping of profile fields"),
])
def test_a_profile_file_that_is_not_one_is_one_line(tmp_path, content, message):
    """Profiles are read as experiment files are (terabrain.config.loader.read_yaml_file)."""
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_profile(str(path))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_cli_bad_profile_exits_2_with_one_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ncompute: {peak_flops: 1}\n")
    assert main(["plan", "lbann-ae-50k", "--gpus", "8", "--profile", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("terabrain: error: --profile")


def _compute_edited(tmp_path, base: str, **fields) -> MachineProfile:
    """The built-in profile ``base`` with ``fields`` of its compute section replaced."""
    raw = yaml.safe_load(load_profile(base).to_yaml())
    raw["compute"].update(fields)
    path = tmp_path / f"{base}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


def test_alpha_beta_links_and_nodes():
    h100 = load_profile("h100-sxm")
    work = StepWork(rows=1, transfers=[Transfer("all_reduce", "data", 1e9)])
    inside = predict(h100, work, 8, 1)  # 8 ranks: one node, NVLink
    across = predict(h100, work, 16, 1)  # two nodes: InfiniBand
    assert across.communication_s > 5 * inside.communication_s
    # Not overlapped: all of it is exposed and adds to the step.
    assert inside.exposed_s == inside.communication_s
    assert inside.step_s == pytest.approx(inside.compute_s + inside.exposed_s)
    # Overlapped: hidden behind the weight-gradient products, exposed only beyond them.
    hidden = StepWork(rows=1, transfers=[Transfer("all_reduce", "data", 1e9, overlapped=True)])
    assert predict(h100, hidden, 8, 1).exposed_s == pytest.approx(inside.exposed_s)
    gradient = Gemm(4096, 4096, 2048, layout="tn")  # well under the all-reduce on an H100
    hidden.gemms = [gradient]
    behind = predict(h100, StepWork(rows=1, gemms=[gradient]), 8, 1).compute_s - h100.compute.step_overhead_s
    assert 0 < behind < inside.exposed_s
    assert predict(h100, hidden, 8, 1).exposed_s == pytest.approx(inside.exposed_s - behind)
    hidden.gemms = [Gemm(4096, 4096, 2048, layout="nn")]  # a forward product: nothing to hide behind
    assert predict(h100, hidden, 8, 1).exposed_s == pytest.approx(inside.exposed_s)
    # alpha: a tiny all-reduce costs 2 (k-1) steps of latency.
    tiny = StepWork(rows=1, transfers=[Transfer("all_reduce", "data", 4)])
    seconds = predict(h100, tiny, 8, 1).communication_s
    assert seconds == pytest.approx(14 * h100.network.intra_node.all_reduce.alpha_s, rel=0.01)


def test_every_blocking_call_pays_the_links_cost_inside_a_step(tmp_path):
    """Link.sync_s (what a call costs between phases of compute, beyond alpha and bytes) is
    charged once per call the step waits for, and not to an overlapped exchange, which is
    waited for once at the end; a split deep network pays it for each of its collectives."""
    raw = yaml.safe_load(load_profile("llnl-catalyst").to_yaml())
    plain = load_profile("llnl-catalyst")
    for links in ("intra_node", "inter_node"):
        for collective in raw["network"][links]:
            raw["network"][links][collective]["sync_s"] = 0.002
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    synced = load_profile(str(path))
    calls = StepWork(rows=1, transfers=[Transfer("point_to_point", "model", 1e4, 5),
                                        Transfer("all_reduce", "model", 4, 3)])
    assert predict(synced, calls, 1, 2).exposed_s - predict(plain, calls, 1, 2).exposed_s \
        == pytest.approx(8 * 0.002)
    overlapped = StepWork(rows=1, transfers=[Transfer("all_reduce", "data", 1e6, 4, overlapped=True)])
    assert predict(synced, overlapped, 2, 1).communication_s == pytest.approx(
        predict(plain, overlapped, 2, 1).communication_s)
    # Started back to back, the overlapped calls' latencies overlap: the chain of 4 pays
    # alpha once and each call's bytes; 4 blocking calls pay alpha 4 times.
    link = plain.network.intra_node.all_reduce
    assert predict(plain, overlapped, 2, 1).communication_s == pytest.approx(
        2 * link.alpha_s + 4 * 1e6 / link.bandwidth)
    blocking = StepWork(rows=1, transfers=[Transfer("all_reduce", "data", 1e6, 4)])
    assert predict(plain, blocking, 2, 1).communication_s == pytest.approx(
        4 * (2 * link.alpha_s + 1e6 / link.bandwidth + link.sync_s))
    # yfcc-15b-small's pipelined step split over 2 ranks: 10 halo exchanges, 7 all-reduces
    # waited for (3 alphas, 2 LCN spreads, the dense layer's reconstruction, the losses'
    # total and parts in one; the pre-emption check is read a step later) and 2 all-gathers, as
    # tests/parallel_scripts/deep_split_collectives.py counts them in a real run
    # (tests/test_deep_model_parallel.py).
    sets = ["model.schedule=pipelined", "model.start_after=2"]
    config = load_experiment("yfcc-15b-small", sets)
    with_sync = plan_experiment(config, 2, 10**11, profile=synced, gpus_per_node=2)
    without = plan_experiment(config, 2, 10**11, profile=plain, gpus_per_node=2)
    split = {(s.data, s.model): s for s in with_sync.splits}
    alone = {(s.data, s.model): s for s in without.splits}
    assert split[(1, 2)].exposed_s - alone[(1, 2)].exposed_s == pytest.approx(19 * 0.002)


def test_a_deep_network_pays_its_layers_fixed_cost_per_evaluation(tmp_path):
    """compute.deep_layer_overhead_s: each layer of the pipelined step, each closure
    evaluation; a hidden-unit learner does not pay it."""
    computes = {}
    for overhead in (0.0, 0.003):
        profile = _compute_edited(tmp_path, "llnl-catalyst", deep_layer_overhead_s=overhead)
        for name, sets in (("yfcc-15b-small", ["model.schedule=pipelined"]),
                           ("lbann-ae-small", [])):
            plan = plan_experiment(load_experiment(name, sets), 1, 10**11, profile=profile)
            computes[(overhead, name)] = plan.splits[0].compute_s
    assert computes[(0.003, "yfcc-15b-small")] - computes[(0.0, "yfcc-15b-small")] == pytest.approx(3 * 0.003)
    assert computes[(0.003, "lbann-ae-small")] == pytest.approx(computes[(0.0, "lbann-ae-small")])


def test_overlapped_exchange_on_a_shared_cpu_node_costs_its_cpu_time(tmp_path):
    """gloo's copies and sums run on the cores that compute: hidden is not free there."""
    raw = yaml.safe_load(load_profile("llnl-catalyst").to_yaml())
    for links in ("intra_node", "inter_node"):
        raw["network"][links]["all_reduce"]["cpu_fraction"] = 0.75
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    cpu = load_profile(str(path))
    assert cpu.compute.ranks_share_device
    gradient = Gemm(4096, 4096, 128, layout="tn")
    flat = StepWork(rows=1, gemms=[gradient], transfers=[Transfer("all_reduce", "data", 64e6)])
    overlapped = StepWork(rows=1, gemms=[gradient],
                          transfers=[Transfer("all_reduce", "data", 64e6, overlapped=True)])
    before, during = predict(cpu, flat, 2, 1), predict(cpu, overlapped, 2, 1)
    assert 0 < during.exposed_s < before.exposed_s
    # The part beside the products takes its share of the cores; the exposed rest is the
    # wait itself, not counted twice.
    beside = during.communication_s - during.exposed_s
    assert during.compute_s == pytest.approx(before.compute_s + 0.75 * beside)
    # All of it hidden behind a longer gradient: all of its CPU time is compute.
    longer = [Gemm(4096, 4096, 4096, layout="tn")]
    plain = predict(cpu, StepWork(rows=1, gemms=longer), 2, 1)
    hidden = predict(cpu, StepWork(rows=1, gemms=longer, transfers=overlapped.transfers), 2, 1)
    assert hidden.exposed_s == 0
    assert hidden.compute_s == pytest.approx(plain.compute_s + 0.75 * hidden.communication_s)
    # Without the measurement (a GPU's copy engines), overlapping costs no compute.
    assert predict(load_profile("llnl-catalyst"), overlapped, 2, 1).compute_s == pytest.approx(
        before.compute_s)


def test_plan_with_profile_recommends_the_fastest_split_that_fits(capsys):
    assert main(["plan", "lbann-ae-400k", "--gpus", "64", "--profile", "h100-sxm",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"] == "h100-sxm" and plan["device_memory"] == 80_000_000_000
    for split in plan["splits"]:
        for key in ("data", "model", "fits", "peak_bytes", "sent_bytes", "step_time_s",
                    "recommended"):
            assert key in split
    timed = [s for s in plan["splits"] if s["fits"]]
    assert timed
    fastest = min(timed, key=lambda s: s["step_time_s"])
    assert fastest["recommended"] and sum(s["recommended"] for s in plan["splits"]) == 1
    for split in timed:
        assert split["step_time_s"] == pytest.approx(split["compute_s"] + split["exposed_s"])
        assert split["images_per_s"] == pytest.approx(plan["batch"] / split["step_time_s"])


def test_plan_text_has_the_time_columns():
    config = load_experiment("lbann-ae-small", [])
    plan = plan_experiment(config, 4, 10**10, profile=load_profile("a100-80gb"),
                           dataset_size=1_000_000)
    from terabrain.capacity.planner import format_plan

    text = format_plan(plan)
    header = next(line for line in text.splitlines() if line.startswith("data"))
    for column in ("step", "compute", "comm", "exposed", "images/s", "epoch"):
        assert column in header.split()
    for split in plan.splits:
        if split.valid:
            assert split.epoch_s == pytest.approx(1_000_000 / split.images_per_s)


def test_data_parallel_exchange_grows_with_replicas_and_shrinks_when_compressed():
    config = load_experiment("lbann-ae-small", [])
    h100 = load_profile("h100-sxm")
    plain = plan_experiment(config, 8, 10**11, profile=h100)
    by_data = {s.data: s for s in plain.splits}
    assert by_data[8].exposed_s > by_data[2].exposed_s > 0
    config16 = load_experiment("lbann-ae-small", ["parallel.compression=bf16"])
    half = {s.data: s for s in plan_experiment(config16, 8, 10**11, profile=h100).splits}
    assert half[8].communication_s < by_data[8].communication_s


def test_a_deep_networks_activation_work_runs_at_its_own_measured_rate(tmp_path):
    """compute.activation_bandwidth prices a deep layer's losses, LCN and pooling (small
    kernels); unset, they run at the elementwise rate. Hidden-unit learners do not use it."""
    def compute(name: str, **fields) -> float:
        profile = _compute_edited(tmp_path, "llnl-catalyst", **fields)
        return plan_experiment(load_experiment(name, []), 1, 10**11, profile=profile).splits[0].compute_s

    elementwise = load_profile("llnl-catalyst").compute.elementwise_bandwidth
    at_elementwise = compute("yfcc-15b-small")
    assert compute("yfcc-15b-small", activation_bandwidth=elementwise) == pytest.approx(at_elementwise)
    slower = compute("yfcc-15b-small", activation_bandwidth=elementwise / 2)
    slowest = compute("yfcc-15b-small", activation_bandwidth=elementwise / 4)
    # Each halving adds the activation work's time at the rate before it: 1, then 2 units.
    assert slower > at_elementwise and slowest - slower == pytest.approx(2 * (slower - at_elementwise))
    assert compute("lbann-ae-small", activation_bandwidth=elementwise / 4) == pytest.approx(
        compute("lbann-ae-small"))


def test_a_pipelined_networks_forward_copies_run_at_the_measured_encode_rate(tmp_path):
    """local_points of layout encode (a local layer's codes alone) price the frozen forward
    copies; the layers trained run at the nn points. Without encode points, the copies are
    priced at the trained rate, as profiles measured before these points were."""
    trained = {"m": 192, "n": 8, "k": 192, "flops_per_s": 2e10, "layout": "nn"}

    def compute(schedule: str, *encode_rates: float) -> float:
        points = [trained] + [{**trained, "layout": "encode", "flops_per_s": rate} for rate in encode_rates]
        profile = _compute_edited(tmp_path, "llnl-catalyst", local_points=points)
        config = load_experiment("yfcc-15b-small", [f"model.schedule={schedule}"])
        return plan_experiment(config, 1, 10**11, profile=profile).splits[0].compute_s

    slow, fast = compute("pipelined", 5e9), compute("pipelined", 1e10)
    assert slow > fast
    # Halving the rate doubles the copies' time: what they cost at 1e10 is slow - fast.
    faster = compute("pipelined", 2e10)
    assert faster == pytest.approx(fast - (slow - fast) / 2)
    assert compute("pipelined") == pytest.approx(faster)


def test_deep_networks_are_timed_and_local_layers_are_slower_than_gemms():
    config = load_experiment("yfcc-15b", [])
    plan = plan_experiment(config, 64, 80 * 10**9, profile=load_profile("h100-sxm"))
    timed = [s for s in plan.splits if s.step_time_s is not None]
    assert timed and all(s.compute_s > 0 for s in timed)
    # More model ranks split the local layers' rows: less compute per rank.
    by_model = sorted(timed, key=lambda s: s.model)
    assert by_model[-1].compute_s < by_model[0].compute_s


def test_reading_is_per_replica_so_model_parallel_strong_scaling_flattens():
    """Seed 001's taper: every rank of a replica reads the whole batch, so as model ranks are
    added the compute shrinks and reading does not."""
    # 49,152 hidden units (~ the seed's 50K) divide evenly over 96 ... 1,536 ranks.
    config = load_experiment("lbann-ae-50k", ["model.hidden=49152"])
    catalyst = load_profile("llnl-catalyst")
    rates = {}
    for nodes in (8, 32, 128):
        ranks = 12 * nodes
        work = plan_experiment(config, ranks, 10**12, profile=catalyst)  # memory: not the question
        split = next(s for s in work.splits if s.data == 1)
        from terabrain.capacity.timing import read_seconds

        read = read_seconds(catalyst, split.rows_per_rank, ("pixels", 196_608), 12)
        rates[nodes] = 1.0 / (split.compute_s + split.exposed_s + read)
    assert rates[32] / rates[8] > 2.0  # good strong scaling 8 -> 32 nodes
    assert rates[128] / rates[32] < rates[32] / rates[8]  # tapering


def test_a_slow_compressor_costs_compute_time(tmp_path):
    raw = yaml.safe_load(load_profile("h100-sxm").to_yaml())
    config = load_experiment("lbann-ae-small", ["parallel.compression=onebit"])
    steps = []
    for rate in (1e12, 1e8):
        raw["compute"]["compression_bandwidth"] = {"onebit": rate}
        path = tmp_path / f"p{rate:g}.yaml"
        path.write_text(yaml.safe_dump(raw))
        plan = plan_experiment(config, 2, 10**11, profile=load_profile(str(path)))
        steps.append(next(s for s in plan.splits if s.data == 2))
    fast, slow = steps
    elements = fast.local_parameters
    # Two compress + decompress passes over the fp32 gradient per exchange, and one over
    # this rank's half of it (its range, re-quantized).
    assert slow.compute_s - fast.compute_s == pytest.approx(
        2.5 * 4 * elements * (1 / 1e8 - 1 / 1e12), rel=1e-6)


def test_the_packed_exchange_pays_its_own_copies_beside_the_compressor():
    """The one-bit exchange copies, sums and divides the whole gradient around its
    compressor (17 streams per value, 7 of them into new buffers) and its own range's
    residuals (6 per value of a 1/n range): more local traffic than the plain all-reduce's
    flat buffer, a little less per value on more ranks."""
    from terabrain.capacity.work import gradient_exchange

    elements = 1_000_000
    plain = load_experiment("lbann-ae-small", ["parallel.overlap=false"]).parallel
    onebit = load_experiment("lbann-ae-small", ["parallel.compression=onebit"]).parallel
    _, (plain_streams, plain_fresh), none = gradient_exchange(plain, 2, elements, 0)
    assert none is None
    copies = {n: gradient_exchange(onebit, n, elements, 0)[1] for n in (2, 4)}
    for n, (in_place, fresh) in copies.items():
        assert in_place == pytest.approx(4 * elements * (10 + 6 / n))
        assert fresh == pytest.approx(4 * elements * 7)
    assert sum(copies[2]) > 3 * (plain_streams + plain_fresh)
    assert sum(copies[4]) < sum(copies[2])


def test_a_model_parallel_split_pays_the_sharded_dispatch_per_evaluation(tmp_path):
    """Units split over the model axis run as DTensors: each closure evaluation costs the
    profile's sharded_evaluation_s beyond its work; data-parallel splits do not pay it."""
    splits = {}
    for extra in (0.0, 0.004):
        profile = _compute_edited(tmp_path, "h100-sxm", sharded_evaluation_s=extra)
        for optimizer, evaluations in (("sgd", 1), ("lbfgs", None)):
            sets = [f"optimizer.name={optimizer}"] + (["optimizer.max_iter=5"] if evaluations is None else [])
            plan = plan_experiment(load_experiment("lbann-ae-small", sets), 2, 10**11,
                                   profile=profile)
            for split in plan.splits:
                splits[(extra, optimizer, split.data, split.model)] = split.compute_s
    assert splits[(0.004, "sgd", 1, 2)] - splits[(0.0, "sgd", 1, 2)] == pytest.approx(0.004)
    assert splits[(0.004, "sgd", 2, 1)] == pytest.approx(splits[(0.0, "sgd", 2, 1)])
    # L-BFGS evaluates the closure several times per step, each one sharded.
    lbfgs_extra = splits[(0.004, "lbfgs", 1, 2)] - splits[(0.0, "lbfgs", 1, 2)]
    assert lbfgs_extra > 0.004 * 1.5


def test_cli_plan_needs_a_memory_size_or_a_profile(capsys):
    assert main(["plan", "lbann-ae-50k", "--gpus", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory" in err[0] and "--profile" in err[0]


def test_ranks_sharing_a_cpu_node_compute_at_the_rates_measured_with_that_many_at_once(tmp_path):
    """compute.shared: the entry for the ranks per node decides (not the node's rate divided);
    more ranks than any entry time-share the largest one."""
    raw = yaml.safe_load(load_profile("llnl-catalyst").to_yaml())
    point = {"m": 40, "n": 1024, "k": 3072}

    def entry(ranks, flops):
        return {"ranks": ranks, "threads": max(1, 2 // ranks),
                "gemm_points": [{**point, "flops_per_s": flops}], "elementwise_bandwidth": 1e10,
                "optimizer_bandwidth": 1e10, "fresh_bandwidth": 1e10, "step_overhead_s": 0.0}

    raw["compute"].update(ranks_share_device=True, step_overhead_s=0.0,
                          gemm_points=[{**point, "flops_per_s": 1e11}],
                          shared=[entry(1, 1e11), entry(2, 4e10), entry(4, 2e10)])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    profile = load_profile(str(path))
    work = StepWork(rows=40, gemms=[Gemm(40, 1024, 3072)])
    flops = work.flops

    def seconds(ranks):
        return predict(profile, work, 1, ranks, gpus_per_node=ranks).compute_s

    assert seconds(1) == pytest.approx(flops / 1e11, rel=1e-6)
    assert seconds(2) == pytest.approx(flops / 4e10, rel=1e-6)   # not 2 x the 1-rank time
    assert seconds(4) == pytest.approx(flops / 2e10, rel=1e-6)
    assert seconds(8) == pytest.approx(2 * flops / 2e10, rel=1e-6)  # 8 ranks share 4's rate
    assert seconds(3) == pytest.approx(0.75 * flops / 2e10, rel=1e-6)  # 4's entry, 4/3 the share


def test_links_and_sharded_dispatch_follow_the_ranks_on_the_node(tmp_path):
    """network.by_ranks_per_node: a split with R ranks on a node pays the links (and the
    sharded dispatch) measured with R there, else the nearest measured above, else the
    largest; inter-node links and profiles without entries are as before."""
    raw = yaml.safe_load(load_profile("llnl-catalyst").to_yaml())
    plain = load_profile("llnl-catalyst")

    def links(alpha):
        return {c: {"alpha_s": alpha, "bandwidth": 1e9} for c in
                ("all_reduce", "all_gather", "reduce_scatter", "point_to_point")}

    raw["network"]["by_ranks_per_node"] = [
        {"ranks_per_node": 2, "links": links(1e-4), "sharded_evaluation_s": 0.001},
        {"ranks_per_node": 4, "links": links(1e-3), "sharded_evaluation_s": 0.005}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    profile = load_profile(str(path))
    calls = StepWork(rows=1, transfers=[Transfer("all_reduce", "world", 4, 3)],
                     sharded_evaluations=1)

    def step(ranks, per_node, chosen=profile):
        return predict(chosen, calls, 1, ranks, gpus_per_node=per_node)

    # 3 all-reduces of 4 bytes: alpha x 2(R-1) ring steps each, plus the bytes.
    def ring(alpha, ranks):
        return 3 * (alpha * 2 * (ranks - 1) + 4 * 2 * (ranks - 1) / ranks / 1e9)

    assert step(2, 2).exposed_s == pytest.approx(ring(1e-4, 2), rel=1e-6)
    assert step(4, 4).exposed_s == pytest.approx(ring(1e-3, 4), rel=1e-6)
    # A 2 x 2 mesh: groups of 2, but 4 ranks on the node share it.
    model_axis = StepWork(rows=1, transfers=[Transfer("all_reduce", "model", 4, 3)])
    assert predict(profile, model_axis, 2, 2, gpus_per_node=4).exposed_s == pytest.approx(
        ring(1e-3, 2), rel=1e-6)
    assert step(3, 3).exposed_s == pytest.approx(ring(1e-3, 3), rel=1e-6)  # the entry above
    assert step(8, 8).exposed_s == pytest.approx(ring(1e-3, 8), rel=1e-6)  # the largest
    assert step(2, 2).compute_s - step(2, 2, plain).compute_s == pytest.approx(
        0.001 - plain.compute.sharded_evaluation_s)
    assert step(4, 4).compute_s - step(4, 4, plain).compute_s == pytest.approx(
        0.005 - plain.compute.sharded_evaluation_s)
    # Across nodes (4 ranks, 2 a node): the inter-node links, as without entries.
    assert step(4, 2).exposed_s == pytest.approx(step(4, 2, plain).exposed_s)


def test_the_optimizer_streams_follow_the_kernel_that_updates():
    """Fused updates (one rank, data parallel) move SGD with momentum's 5 streams a
    parameter; over DTensors (units split over the model axis) SGD runs torch.optim's loop,
    8 streams; Adam is fused both ways (terabrain.capacity.costs.fused_update)."""
    from terabrain.capacity.planner import data_shape
    from terabrain.learners.registry import learner_of

    bytes_per_local = {}
    for optimizer in ("sgd", "adam"):
        config = load_experiment("lbann-ae-small", [f"optimizer.name={optimizer}",
                                                    "optimizer.momentum=0.9" if optimizer == "sgd"
                                                    else "optimizer.betas=[0.9, 0.999]"])
        capacity = learner_of(config).capacity(config, data_shape(config)[0])
        for data, model in ((1, 1), (2, 1), (1, 2)):
            work = capacity.work(data, model, 40)
            local = capacity.per_rank(data, model, 40).local_parameters
            bytes_per_local[(optimizer, data, model)] = work.optimizer_bytes / (4 * local)
    assert bytes_per_local[("sgd", 1, 1)] == bytes_per_local[("sgd", 2, 1)] == 5
    assert bytes_per_local[("sgd", 1, 2)] == 8
    assert bytes_per_local[("adam", 1, 1)] == bytes_per_local[("adam", 1, 2)] == 7
