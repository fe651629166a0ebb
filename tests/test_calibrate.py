"""`terabrain calibrate`: a profile measured on this machine, and the links measured with real
gloo collectives between 2 ranks."""

from __future__ import annotations

import os

import pytest

from conftest import SCRIPTS, torchrun
from terabrain.capacity.calibrate import fit_alpha_beta, merge_medians, shared_rank_counts
from terabrain.capacity.planner import plan_experiment
from terabrain.capacity.profile import load_profile
from terabrain.config.loader import load_experiment


def test_fit_alpha_beta_recovers_latency_and_bandwidth():
    alpha, bandwidth, steps = 20e-6, 2e9, 6
    points = [(size, steps * alpha + size / bandwidth) for size in (4e3, 1e6, 8e6, 32e6)]
    fitted_alpha, fitted_bandwidth = fit_alpha_beta(points, steps)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_fit_alpha_beta_keeps_the_latency_when_large_messages_are_noisy():
    """A few percent of noise on the largest message's milliseconds is more than the whole
    latency: the fit must still find it from the small messages (relative error)."""
    alpha, bandwidth, steps = 50e-6, 2e9, 1
    sizes = (64, 4e3, 256e3, 4e6, 32e6)
    noise = (1.0, 1.02, 0.98, 1.03, 0.97)
    points = [(size, (steps * alpha + size / bandwidth) * f) for size, f in zip(sizes, noise)]
    fitted_alpha, fitted_bandwidth = fit_alpha_beta(points, steps)
    assert fitted_alpha == pytest.approx(alpha, rel=0.05)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=0.05)


def test_shared_rank_counts_double_up_to_the_cores_and_oversubscribe_small_nodes():
    assert shared_rank_counts(1) == [1, 2]
    assert shared_rank_counts(2) == [1, 2, 4]
    assert shared_rank_counts(6) == [1, 2, 4, 12]
    assert shared_rank_counts(64) == [1, 2, 4, 8, 16, 32, 64]


def test_a_point_keeps_its_median_round_so_one_slow_moment_does_not_set_it():
    # Round 2 ran while the machine was slow for a few seconds (every point low), round 3
    # was slow for the second point only.
    rounds = [[100.0, 50.0], [60.0, 30.0], [105.0, 20.0]]
    points = merge_medians([[{"m": 40, "layout": "nt", "flops_per_s": v} for v in r] for r in rounds])
    assert [p["flops_per_s"] for p in points] == [100.0, 30.0]
    assert all(p["m"] == 40 and p["layout"] == "nt" for p in points)


def test_repeated_calibrations_merge_figure_by_figure():
    rounds = [{"name": "a", "points": [{"m": 40, "rate": 10.0}], "bw": {"fp16": 1.0}, "x": None},
              {"name": "b", "points": [{"m": 40, "rate": 30.0}], "bw": {"fp16": 5.0}, "x": None},
              {"name": "c", "points": [{"m": 40, "rate": 12.0}], "bw": {"fp16": 2.0}, "x": None}]
    assert merge_medians(rounds) == {"name": "a", "points": [{"m": 40, "rate": 12.0}],
                                     "bw": {"fp16": 2.0}, "x": None}
    assert merge_medians([{"ranks": 2}, {"ranks": 2}]) == {"ranks": 2}  # stays an int


def test_calibrate_repeats_keeps_the_median_of_its_rounds(cli, tmp_path):
    out = tmp_path / "twice.yaml"
    result = cli("calibrate", "--quick", "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("round ") == 2
    profile = load_profile(str(out))
    assert "median of 2 rounds" in profile.sources["compute"]
    # The peak is the fastest of the points kept, not the median of each round's fastest.
    assert profile.compute.peak_flops == max(p.flops_per_s for p in profile.compute.gemm_points)
    bad = cli("calibrate", "--quick", "--repeats", "0", "--out", str(tmp_path / "no.yaml"))
    assert bad.returncode == 2 and "--repeats 0" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_calibrate_writes_a_profile_that_plan_reads(cli, tmp_path):
    out = tmp_path / "machine.yaml"
    result = cli("calibrate", "--quick", "--out", str(out), "--name", "here")
    assert result.returncode == 0, result.stderr
    profile = load_profile(str(out))
    assert profile.name == "here" and profile.compute.ranks_share_device
    assert len(profile.compute.gemm_points) >= 4
    assert profile.compute.peak_flops == max(p.flops_per_s for p in profile.compute.gemm_points)
    assert "not measured" in profile.sources["network"]  # one process: no links
    assert set(profile.compute.compression_bandwidth) == {"fp16", "bf16", "onebit", "threshold",
                                                          "adaptive"}
    # Each locally connected shape trained one step (nn) and encoded alone (encode, a frozen
    # forward copy): one product with its copies takes less than six with theirs.
    # A deep layer's activation work (losses, LCN) is measured as such.
    assert profile.compute.activation_bandwidth > 0
    assert profile.compute.shared[0].activation_bandwidth == profile.compute.activation_bandwidth
    trained = {(p.m, p.n, p.k): p for p in profile.compute.local_points if p.layout == "nn"}
    encoded = {(p.m, p.n, p.k): p for p in profile.compute.local_points if p.layout == "encode"}
    assert trained and set(encoded) == set(trained)
    for shape, point in trained.items():
        assert 1 / encoded[shape].flops_per_s < 6 / point.flops_per_s
    # --quick: only the one-rank entry (all cores in one process); the full run measures
    # 1, 2, 4 ... ranks at once (the slow test below).
    assert [(e.ranks, e.threads) for e in profile.compute.shared] == [(1, os.cpu_count() or 1)]
    # A deep network's layer costs more than nothing beyond a step's fixed cost (Python, LCN,
    # losses, the schedule): measured on a tiny pipelined network.
    assert profile.compute.deep_layer_overhead_s > 0
    assert profile.compute.shared[0].deep_layer_overhead_s == profile.compute.deep_layer_overhead_s
    plan = plan_experiment(load_experiment("lbann-ae-small", []), 2, profile.device_memory,
                           profile=profile)
    assert all(s.step_time_s > 0 for s in plan.splits if s.valid)


@pytest.mark.slow
def test_calibrate_under_torchrun_measures_the_links_and_ranks_at_once(tmp_path):
    out = tmp_path / "two.yaml"
    result = torchrun(2, "-m", "terabrain", "calibrate", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    profile = load_profile(str(out))
    # What one rank gets with 1, 2, 4 ... ranks computing at once, each with cores / ranks
    # threads, measured by that many real processes.
    cores = os.cpu_count() or 1
    assert [e.ranks for e in profile.compute.shared] == shared_rank_counts(cores)
    for entry in profile.compute.shared:
        assert entry.threads == max(1, cores // entry.ranks)
        assert len(entry.gemm_points) == len(profile.compute.gemm_points)
        assert {p.layout for p in entry.gemm_points} == {"nn", "nt", "tn", "tn+"}
        assert len(entry.local_points) == len(profile.compute.local_points) > 0
        assert entry.fresh_bandwidth > 0 and set(entry.compression_bandwidth) == set(
            profile.compute.compression_bandwidth)
    assert "2 ranks on one node" in profile.sources["network"]
    links = profile.network.intra_node
    for collective in ("all_reduce", "all_gather", "reduce_scatter", "point_to_point"):
        assert getattr(links, collective).bandwidth > 1e6  # loopback TCP moves more than 1 MB/s
    assert profile.network.backend == "gloo"
    # A model-parallel evaluation's dispatch, measured on a tiny layer split over the ranks.
    assert profile.compute.sharded_evaluation_s > 0


def test_the_in_step_cost_of_a_call_follows_what_each_call_costs():
    """Link.sync_s on 2 gloo ranks: with every all-reduce made 10 ms slower, the all-reduce's
    in-step cost grows by about 10 ms and the point-to-point one much less."""
    result = torchrun(2, str(SCRIPTS / "sync_cost.py"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}: ok" in result.stdout, result.stdout


def test_one_node_of_4_ranks_also_measures_2_of_them_alone():
    """calibrate under 4 ranks on one node: the first 2 ranks' links and sharded dispatch are
    measured while the other 2 wait idle (network.by_ranks_per_node)."""
    result = torchrun(4, str(SCRIPTS / "smaller_groups.py"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for rank in range(4):
        assert f"rank {rank}: ok" in result.stdout, result.stdout
