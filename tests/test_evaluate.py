"""`terabrain evaluate`: the single-layer protocol's pieces on scikit-learn's digits, with a
tiny RICA run on 4x4 patches trained inside the test."""

import json

import numpy as np
import pytest
import torch

from terabrain.analysis import evaluate as evaluation
from terabrain.analysis.single_layer import (
    WhitenedPatches, extract, grid_bounds, grid_pool, pooled_features, quadrant_bounds,
    quadrant_pool, random_unit_filters,
)
from terabrain.data.patches import remove_patch_mean

TINY = ["data.patch_size=4", "data.num_patches=1500", "data.holdout_patches=300",
        "data.whitening_fit_samples=1500", "model.hidden=12", "train.steps=2",
        "optimizer.max_iter=10", "train.checkpoint_every=0", "train.progress=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from terabrain.config.loader import load_experiment
    from terabrain.train.run import run_experiment

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_experiment(load_experiment("natural-patches-rica", TINY), run_dir)
    return run_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids spinning on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits(count=40):
    from terabrain.data.embedded import load_digits

    images, labels = load_digits()
    return images.reshape(-1, 8, 8)[:count], labels[:count]


def test_convolutional_extraction_equals_patch_by_patch_encoding(tiny_run):
    """Every position's patch, preprocessed with the run's own functions (mean removal,
    ZCA.apply) and encoded by the model one at a time, then summed by quadrant by hand."""
    from terabrain.analysis.loaded_run import load_run

    run = load_run(tiny_run)
    patches = evaluation.patch_pipeline(run)
    images, _ = digits(6)

    def encoder(rows):
        return run.model.encode(rows).abs()

    with torch.no_grad():
        fast = pooled_features(torch.from_numpy(images), patches, encoder)
        k = run.config.model.hidden
        expected = torch.zeros(len(images), 4 * k)
        for n, image in enumerate(images):
            for y in range(5):  # 8 - 4 + 1 positions per axis; halves [0, 3) and [3, 5)
                for x in range(5):
                    row = remove_patch_mean(image[y:y + 4, x:x + 4].reshape(1, -1))
                    code = encoder(torch.from_numpy(run.whitening.apply(row)))[0]
                    quadrant = 2 * (y >= 3) + (x >= 3)
                    expected[n, quadrant * k:(quadrant + 1) * k] += code
    assert fast.shape == (6, 4 * k)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)

    # The stored float16 features are the same, divided by each quadrant's positions.
    stored = torch.from_numpy(extract(images, patches, encoder, k, budget_bytes=1).astype(np.float32))
    positions = torch.tensor([9.0, 6.0, 6.0, 4.0]).repeat_interleave(k)
    torch.testing.assert_close(stored * positions, expected, rtol=2e-3, atol=2e-3)


def test_an_affine_encoder_runs_as_one_product_and_others_are_left_alone(tiny_run):
    """RICA's encode (row-norm scaling, alpha) is read off as one matrix; a nonlinear
    encoder is not mistaken for one."""
    from terabrain.analysis.loaded_run import load_run
    from terabrain.analysis.single_layer import affine_encoder, affine_form
    from terabrain.nn.kmeans import triangle

    run = load_run(tiny_run)
    dims = run.config.data.patch_size ** 2
    rows = torch.randn(50, dims, generator=torch.Generator().manual_seed(3))
    form = affine_form(run.model.encode, dims)
    assert form is not None and form[0].shape == (dims, 12)
    with torch.no_grad():
        torch.testing.assert_close(affine_encoder(*form, torch.relu_)(rows),
                                   torch.relu(run.model.encode(rows)), rtol=1e-4, atol=1e-5)
    assert affine_form(lambda r: torch.relu(run.model.encode(r)), dims) is None
    centroids = torch.randn(12, dims)
    assert affine_form(lambda r: triangle(r, centroids), dims) is None


@pytest.mark.parametrize("kind", ["linear", "triangle"])
def test_bf16_extraction_is_fp32_extraction_within_bfloat16_rounding(kind):
    """Whitened rows and filters are rounded to bfloat16 (2^-9 relative each), the products
    accumulate in float32 and their results and each pooled sum are rounded once more: every
    pooled feature is within 4 * 2^-9 of the pooled magnitudes it sums (relu and the
    triangle's clipping do not enlarge an error). The triangle opts out of autocast."""
    from terabrain.analysis.single_layer import affine_encoder
    from terabrain.data.whitening import ZCA
    from terabrain.nn.kmeans import triangle

    rng = np.random.default_rng(0)
    images = rng.random((6, 12, 12)).astype(np.float32)
    sample = rng.random((2000, 16)).astype(np.float32)
    patches = WhitenedPatches(4, True, ZCA.fit(remove_patch_mean(sample), 0.01))
    filters = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    if kind == "linear":
        def encoder(rows):
            return affine_encoder(filters, torch.zeros(40), torch.relu_)(rows)

        def magnitude(rows):
            return (rows.abs() @ filters.abs()).float()
    else:
        def encoder(rows):
            return triangle(rows, filters.T.contiguous())

        def magnitude(rows):
            return torch.cdist(rows.float(), filters.T).mean(dim=1, keepdim=True).expand(-1, 40)
    exact = pooled_features(torch.from_numpy(images), patches, encoder, "fp32")
    fast = pooled_features(torch.from_numpy(images), patches, encoder, "bf16")
    bound = pooled_features(torch.from_numpy(images), patches, magnitude, "fp32")
    assert fast.dtype == torch.float32
    assert ((fast - exact).abs() <= 4 * 2.0**-9 * bound + 1e-6).all()
    if kind == "triangle":  # computed in float32 whatever the autocast
        torch.testing.assert_close(fast, exact)
    else:
        assert not torch.equal(fast, exact)  # bfloat16 did run


def test_a_warm_started_probe_reaches_the_optimum_of_a_cold_one():
    """Convex: started from another penalty's solution, the fit ends at the same weights."""
    from terabrain.analysis.probe import fit_logistic

    images, labels = digits(300)
    x, y = torch.from_numpy(images.reshape(300, -1)), torch.from_numpy(labels)
    cold = fit_logistic(x, y, 10, 1e-2, iterations=300)
    other = fit_logistic(x, y, 10, 1e-1, iterations=300)
    warm = fit_logistic(x, y, 10, 1e-2, iterations=300, start=other)
    assert other.weight.sub(cold.weight).abs().max() > 0.05  # a different starting point
    torch.testing.assert_close(warm.weight, cold.weight, rtol=0, atol=2e-3)
    assert warm.iterations < cold.iterations


def test_grid_pooling_sums_the_right_positions_and_two_is_the_quadrants():
    """A 7 x 5 grid of positions: 3 x 3 cells of rows [0, 3) [3, 5) [5, 7) and columns
    [0, 2) [2, 4) [4, 5); one cell sums everything; 2 x 2 equals quadrant_pool."""
    assert [(s.start, s.stop) for s in grid_bounds(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert [(s.start, s.stop) for s in grid_bounds(5, 3)] == [(0, 2), (2, 4), (4, 5)]
    assert grid_bounds(23, 2) == quadrant_bounds(23) == [slice(0, 12), slice(12, 23)]
    for y in range(7):
        for x in range(5):
            maps = torch.zeros(1, 7, 5, 2)
            maps[0, y, x, 0] = 1.0
            pooled = grid_pool(maps, 3)[0].reshape(9, 2)
            cell = 3 * (0 if y < 3 else 1 if y < 5 else 2) + (0 if x < 2 else 1 if x < 4 else 2)
            assert pooled[:, 0].tolist() == [float(q == cell) for q in range(9)]
            assert pooled[:, 1].abs().sum() == 0
            assert grid_pool(maps, 1)[0].tolist() == [1.0, 0.0]
    maps = torch.rand(3, 7, 5, 4)
    assert torch.equal(grid_pool(maps, 2), quadrant_pool(maps))


def test_quadrant_pooling_sums_the_right_positions():
    # 5 x 4 positions, K = 2: feature 0 is 1 at one position, feature 1 counts every position.
    for y in range(5):
        for x in range(4):
            maps = torch.zeros(1, 5, 4, 2)
            maps[0, y, x, 0] = 1.0
            maps[0, :, :, 1] = 1.0
            pooled = quadrant_pool(maps)[0].reshape(4, 2)
            quadrant = 2 * (y >= 3) + (x >= 2)  # rows [0, 3) / [3, 5), columns [0, 2) / [2, 4)
            assert pooled[:, 0].tolist() == [float(q == quadrant) for q in range(4)]
            assert pooled[:, 1].tolist() == [6.0, 6.0, 4.0, 4.0]


def test_whitened_patches_of_the_convolution_are_the_rows_map():
    """WhitenedPatches' convolution and its row form agree with the run's preprocessing."""
    from terabrain.data.whitening import ZCA

    rng = np.random.default_rng(0)
    sample = rng.random((500, 9)).astype(np.float32)
    zca = ZCA.fit(remove_patch_mean(sample), 0.1)
    patches = WhitenedPatches(3, True, zca)
    image = rng.random((1, 5, 7)).astype(np.float32)
    maps = patches(torch.from_numpy(image))[0]
    for y in range(3):
        for x in range(5):
            raw = image[0, y:y + 3, x:x + 3].reshape(1, -1)
            expected = zca.apply(remove_patch_mean(raw))[0]
            np.testing.assert_allclose(maps[y, x].numpy(), expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(patches.rows(torch.from_numpy(raw))[0].numpy(), expected,
                                       rtol=1e-4, atol=1e-4)


def test_random_filters_have_unit_norm_and_depend_on_the_seed():
    a, b = random_unit_filters(7, 16, 0), random_unit_filters(7, 16, 1)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(7))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, random_unit_filters(7, 16, 0))


def test_the_test_split_is_never_seen_during_model_selection(tiny_run, monkeypatch, tmp_path):
    """The whole evaluation twice: once with the real test images, once with test images of
    NaN and shuffled labels. Every choice (penalty, validation accuracies, k-means centroids'
    features) is the same; only the test accuracy differs."""
    real = evaluation.load_images("digits", 400)
    poisoned = evaluation.Images(real.train, real.train_labels,
                                 np.random.default_rng(0).random(real.test.shape, np.float32), real.test_labels[::-1].copy())
    options = evaluation.EvaluateOptions(data="digits", seeds=2, kmeans_steps=20,
                                         kmeans_patches=2000, probe_iterations=30,
                                         weight_decays=(1e-3, 1e-1), log=lambda line: None)
    results = []
    for images in (real, poisoned):
        monkeypatch.setattr(evaluation, "load_images", lambda *args, images=images: images)
        results.append(evaluation.evaluate(tiny_run, options))
    for clean, dirty in zip(results[0]["rows"], results[1]["rows"]):
        assert clean["features"] == dirty["features"]
        assert clean["weight_decay"] == dirty["weight_decay"]
        assert clean["validation"] == dirty["validation"]
        assert len(clean["seeds"]) == (2 if clean["features"] in ("random", "kmeans") else 1)
        for a, b in zip(clean["seeds"], dirty["seeds"]):  # each seed's own path
            assert a["weight_decay"] == b["weight_decay"] and a["validation"] == b["validation"]
        assert clean["seeds"][0]["weight_decay"] == clean["weight_decay"]
        assert clean["accuracy_mean"] > 0.5  # digits: every feature set learns something
        assert dirty["accuracy_mean"] < 0.5  # noise: about chance
    rows = json.loads((tiny_run / "evaluation.json").read_text())
    assert [r["features"] for r in rows] == ["learned", "random", "kmeans", "pixels"]
    assert all({"features", "k", "accuracy_mean", "accuracy_std"} <= set(r) for r in rows)
    assert rows[0]["k"] == 12 and rows[0]["feature_count"] == 48
    assert not (tiny_run / "evaluation-features").exists()  # the float16 maps are removed


def test_evaluate_command_prints_the_table_and_refuses_bad_options(tiny_run, capsys):
    from terabrain.cli import main

    code = main(["evaluate", str(tiny_run), "--data", "digits", "--max-examples", "200",
                 "--seeds", "2", "--kmeans-steps", "10", "--probe-iterations", "20"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("learned", "random", "kmeans", "pixels"):
        assert name in out
    # The rows reach `terabrain analyze`'s report.
    assert main(["analyze", str(tiny_run), "--concepts", "none", "--max-examples", "100",
                 "--maximize-steps", "2", "--neurons", "2"]) == 0
    report = (tiny_run / "analysis" / "report.md").read_text()
    assert "Single-layer evaluation" in report and "| kmeans | 12 | 48 |" in report
    analysis = json.loads((tiny_run / "analysis" / "analysis.json").read_text())
    assert [r["features"] for r in analysis["evaluation"]] == ["learned", "random", "kmeans", "pixels"]
    assert main(["evaluate", str(tiny_run), "--features", "learned,sift"]) == 2
    assert "--features sift; allowed" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--nonlinearity", "tanh"]) == 2
    assert "--nonlinearity tanh; allowed" in capsys.readouterr().err
    # Another pooling grid: 9K features, recorded with the rows and named in the report.
    assert main(["evaluate", str(tiny_run), "--data", "digits", "--max-examples", "200",
                 "--seeds", "1", "--features", "learned,random", "--pool-grid", "3",
                 "--probe-iterations", "5", "--validation-only"]) == 0
    rows = json.loads((tiny_run / "evaluation.json").read_text())
    assert [r["feature_count"] for r in rows] == [9 * 12, 9 * 12]
    assert rows[0]["protocol"]["pool_grid"] == 3
    capsys.readouterr()
    for bad in ("0", "9"):  # 8x8 digits, 3x3 patches: 6x6 positions
        assert main(["evaluate", str(tiny_run), "--data", "digits", "--max-examples", "200",
                     "--features", "learned", "--pool-grid", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--pool-grid" in err[0], err


def test_a_labelled_folder_is_one_sub_folder_per_class(tmp_path):
    from PIL import Image

    for label, value in (("dark", 20), ("light", 230)):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.fromarray(np.full((12, 10), value + i, np.uint8)).save(tmp_path / label / f"{i}.png")
    images = evaluation.load_images("labelled-folder", None, tmp_path, side=9)
    assert images.train.shape == (12, 9, 9) and images.test.shape == (4, 9, 9)
    for split, labels in ((images.train, images.train_labels), (images.test, images.test_labels)):
        assert ((split.mean(axis=(1, 2)) > 0.5) == (labels == 1)).all()  # light is class 1
    with pytest.raises(Exception, match="one sub-folder of images per class"):
        evaluation.load_images("labelled-folder", None, tmp_path / "dark")


@pytest.mark.parametrize("name", ["relu", "abs", "split", "none"])
def test_an_encoding_as_one_product_is_the_encoding_of_the_codes(name):
    """Coates & Ng 2011's encodings with a threshold t: folded into one product for affine
    encoders (the split as the filters and their negatives), or applied to a module's codes;
    both are the formula written out."""
    from terabrain.analysis.single_layer import Encoding

    generator = torch.Generator().manual_seed(0)
    matrix, offset = torch.randn(9, 5, generator=generator), torch.randn(5, generator=generator)
    rows = torch.randn(30, 9, generator=generator)
    codes = rows @ matrix + offset
    t = 0.0 if name == "none" else 0.3
    expected = {"relu": (codes - t).clamp_min(0), "abs": (codes.abs() - t).clamp_min(0),
                "split": torch.cat([(codes - t).clamp_min(0), (-codes - t).clamp_min(0)], 1),
                "none": codes}[name]
    encoding = Encoding(name, t)
    torch.testing.assert_close(encoding.affine(matrix, offset)(rows), expected)
    torch.testing.assert_close(encoding(codes.clone()), expected)
    assert expected.shape[1] == 5 * encoding.outputs_per_filter


def test_a_negative_threshold_or_a_threshold_without_a_nonlinearity_is_refused():
    from terabrain.analysis.single_layer import Encoding
    from terabrain.errors import ConfigError

    for name, t in (("relu", -0.1), ("none", 0.5)):
        with pytest.raises(ConfigError, match="--threshold"):
            Encoding(name, t)
    with pytest.raises(ConfigError, match="--nonlinearity .tanh.; allowed"):
        Encoding("tanh")


def test_validation_only_chooses_as_the_full_evaluation_without_the_test_split(tiny_run,
                                                                               monkeypatch):
    """``score_test=False`` (``--validation-only``, for sweeps) makes the same choices and
    validation accuracies as the full evaluation, never extracts the test split (its images
    are NaN here, which extraction refuses), and reports no test accuracy. The polarity split
    gives two maps per filter: 8K features, K still the filter count."""
    real = evaluation.load_images("digits", 300)
    poisoned = evaluation.Images(real.train, real.train_labels,
                                 np.full(real.test.shape, np.nan, np.float32), real.test_labels)
    options = {"data": "digits", "seeds": 2, "features": ("learned", "random"),
               "probe_iterations": 20, "weight_decays": (1e-3, 1e-1), "nonlinearity": "split",
               "threshold": 0.1, "log": lambda line: None}
    monkeypatch.setattr(evaluation, "load_images", lambda *args: real)
    full = evaluation.evaluate(tiny_run, evaluation.EvaluateOptions(**options))
    monkeypatch.setattr(evaluation, "load_images", lambda *args: poisoned)
    chosen = evaluation.evaluate(tiny_run, evaluation.EvaluateOptions(**options, score_test=False))
    for a, b in zip(full["rows"], chosen["rows"], strict=True):
        assert a["validation"] == b["validation"] and a["weight_decay"] == b["weight_decay"]
        assert a["accuracy_mean"] > 0.5 and b["accuracy_mean"] is None
        assert a["k"] == b["k"] == 12 and a["feature_count"] == b["feature_count"] == 8 * 12
    assert len(full["rows"][1]["seeds"]) == 2 and len(chosen["rows"][1]["seeds"]) == 1


def test_a_bfloat16_probe_reaches_the_float32_optimum():
    """The probe's products in bfloat16 (features rounded to 2^-9, float32 weights, loss and
    L-BFGS state) end at weights whose exact float32 objective is within 1% of the float32
    fit's, with the same training accuracy to a percent; the chunked bfloat16 standardisation
    has the float32 statistics."""
    import torch.nn.functional as F

    from terabrain.analysis.probe import fit_logistic, standardize

    images, labels = digits(600)
    x, y = torch.from_numpy(images.reshape(600, -1)).float(), torch.from_numpy(labels)
    z, mean, scale = standardize(x)
    bf16, bf16_mean, bf16_scale = standardize(x.half(), "bf16")
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_mean, mean)
    torch.testing.assert_close(bf16_scale, scale)
    torch.testing.assert_close(bf16.float(), z, rtol=2.0**-8, atol=1e-6)
    for weight_decay in (1e-2, 1e-3):
        exact = fit_logistic(x, y, 10, weight_decay, 300)
        fast = fit_logistic(x, y, 10, weight_decay, 300, precision="bf16")

        def objective(probe, weight_decay=weight_decay):
            return float(F.cross_entropy(z @ probe.weight.T + probe.bias, y)
                         + 0.5 * weight_decay * probe.weight.pow(2).sum())

        assert objective(fast) <= 1.01 * objective(exact)
        assert abs(fast.accuracy(x, y) - exact.accuracy(x, y)) <= 0.01


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_in_hardware(monkeypatch):
    from terabrain.analysis import single_layer

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert single_layer.resolved_precision("auto") == "fp32"  # emulated: 25x slower here
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert single_layer.resolved_precision("auto") == "bf16"
    assert single_layer.resolved_precision("fp32") == "fp32"
