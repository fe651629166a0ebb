"""One seam per concept: the learner registry, the data source table and config sections
that own their fields (issue 11)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import yaml

from terabrain.cli import main
from terabrain.config.loader import (
    builtin_names,
    builtin_text,
    load_experiment,
    to_yaml,
)
from terabrain.config.reference import markdown
from terabrain.data.sources import SOURCES, source_of
from terabrain.errors import ConfigError
from terabrain.learners.registry import LEARNERS, learner_of

PACKAGE = Path(__file__).resolve().parents[1] / "terabrain"


@pytest.fixture(scope="module")
def source_settings(tmp_path_factory) -> dict[str, list[str]]:
    """For every data source, the --set lines that make it valid here (small files)."""
    root = tmp_path_factory.mktemp("sources")
    array = root / "rows.npy"
    np.save(array, np.zeros((40, 8, 8), np.float32))
    activations = root / "activations.npy"
    np.save(activations, np.zeros((40, 64), np.float32))
    images = root / "images"
    images.mkdir()
    metadata = root / "yfcc.tsv"
    metadata.write_text("")
    extra = {
        "npy": [f"data.path={array}"],
        "activations": [f"data.path={activations}"],
        "folder": [f"data.root={images}"],
        "shards": [f"data.root={images}"],
        "yfcc": [f"data.root={images}", f"data.metadata={metadata}"],
    }
    return {name: [f"data.source={name}", *extra.get(name, [])] for name in SOURCES}


def _one_line_or_ok(capsys, args: list[str]) -> None:
    code = main(args)
    captured = capsys.readouterr()
    if code == 0:
        assert "parameters" in captured.out.splitlines()[0]
        return
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("terabrain: error:"), (
        args, code, captured.err[-2000:])
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("name", builtin_names())
def test_plan_exits_0_or_one_line_for_every_builtin_and_source(name, source_settings, capsys):
    """Every built-in on its own data, then on every source of the table: planned, or
    refused with one line (exit 2), never a traceback."""
    _one_line_or_ok(capsys, ["plan", name, "--gpus", "2", "--gpu-memory", "10GB"])
    for settings in source_settings.values():
        sets = [part for line in settings for part in ("--set", line)]
        _one_line_or_ok(capsys, ["plan", name, "--gpus", "2", "--gpu-memory", "10GB", *sets])
        _one_line_or_ok(capsys, ["plan", name, "--gpus", "2", "--gpu-memory", "10GB",
                                 "--batch", "8", *sets])


def test_every_source_plans_for_a_learner_it_fits(source_settings, capsys):
    """An autoencoder plans on every source: the table gives each one's shape and rows
    without reading the data."""
    for name, settings in source_settings.items():
        sets = [part for line in settings for part in ("--set", line)]
        code = main(["plan", "digits-sae", "--gpus", "2", "--gpu-memory", "10GB",
                     "--batch", "8", "--set", "supervised=null", *sets])
        assert code == 0, (name, capsys.readouterr().err)


def test_in_memory_sources_count_their_training_set():
    """faces-deep and faces-rica plan the same in-memory images: the same bytes."""
    from terabrain.capacity import plan_experiment

    deep = plan_experiment(load_experiment("faces-deep"), 1, 10**10)
    rica = plan_experiment(load_experiment("faces-rica"), 1, 10**10)
    rows = load_experiment("faces-deep").data.num_patches
    assert deep.splits[0].dataset == 4 * rows * 16 * 16 > 0
    assert rica.splits[0].dataset == 4 * load_experiment("faces-rica").data.num_patches * 16 * 16


@pytest.mark.parametrize("name", builtin_names())
def test_show_prints_only_applicable_fields_and_round_trips(name, tmp_path, capsys):
    assert main(["show", name]) == 0
    shown = capsys.readouterr().out
    raw = yaml.safe_load(shown)
    config = load_experiment(name)
    assert set(raw["model"]) == set(learner_of(config).section.model_fields)
    assert set(raw["data"]) == set(source_of(config.data).section.model_fields)
    assert set(raw["objective"]) == set(type(config.objective).model_fields)
    assert "schedule" not in raw["train"]
    # optimizer and parallel settings of other optimizers / modes are not shown either
    for section, tag in (("optimizer", "name"), ("parallel", "compression"), ("parallel", "mode")):
        shown_fields = set(raw[section])
        for field in getattr(config, section).inapplicable_fields():
            assert field not in shown_fields, (section, field)
    assert ("max_iter" in raw["optimizer"]) == (config.optimizer.name == "lbfgs")
    assert ("momentum" in raw["optimizer"]) == (config.optimizer.name in ("sgd", "rmsprop"))
    assert "workers" not in raw["parallel"] and "average_every" not in raw["parallel"]
    path = tmp_path / "shown.yaml"
    path.write_text(shown)
    assert to_yaml(load_experiment(str(path))) == shown


def test_a_field_of_another_variant_is_one_line_naming_the_fields(capsys):
    code = main(["show", "lbann-ae-small", "--set", "model.layers=[{kind: dense, maps: 4}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "model.layers is not a field of model.kind=autoencoder; its fields are" in err[0]
    assert "hidden" in err[0] and "tied" in err[0]
    code = main(["show", "natural-patches-rica", "--set", "data.yfcc_tags_any=[cat]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.source=photos" in err[0]


@pytest.mark.parametrize("override, expected", [
    ("optimizer.momentum=0.5", "momentum applies only when name is sgd or rmsprop, and name is lbfgs"),
    ("parallel.workers=4", "workers applies only when mode is hogwild, and mode is sync"),
    ("parallel.threshold_tau=0.1", "threshold_tau applies only when compression is threshold"),
])
def test_a_setting_of_another_optimizer_or_mode_is_refused_in_one_line(override, expected, capsys):
    """It would be ignored silently; a user who sets it means something else."""
    code = main(["show", "natural-patches-rica", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert main(["show", "natural-patches-rica", "--set", "optimizer.name=sgd", "--set",
                 "optimizer.momentum=0.5"]) == 0


def test_switching_the_optimizer_drops_the_experiments_settings_for_the_old_one():
    """lbann-ae-small uses SGD with momentum: switching to Adam or L-BFGS from the command
    line must not trip over the experiment's own momentum."""
    assert load_experiment("lbann-ae-small").optimizer.momentum > 0
    adam = load_experiment("lbann-ae-small", ["optimizer.name=adam"]).optimizer
    assert adam.name == "adam" and adam.momentum == 0.0
    lbfgs = load_experiment("lbann-ae-small", ["optimizer.name=lbfgs", "optimizer.max_iter=4"])
    assert lbfgs.optimizer.max_iter == 4
    with pytest.raises(ConfigError, match="momentum applies only when name is sgd or rmsprop"):
        load_experiment("lbann-ae-small", ["optimizer.name=adam", "optimizer.momentum=0.5"])


def test_the_earlier_single_section_layout_still_loads(tmp_path):
    """A config.yaml written by the earlier layout (every field of every kind and source,
    schedule under train) loads as the same experiment."""
    old = yaml.safe_load(builtin_text("faces-deep"))
    old["model"].pop("schedule")
    old["model"].update(hidden=128, tied=True, activation="sigmoid", dropout=0.0, layers=old["model"]["layers"])
    old["data"].update(path=None, root=None, metadata=None, yfcc_tags_any=[], stream=None,
                       stage_dir=None, order="global", color=False, test_fraction=0.25)
    old["objective"].update(rho=0.05, beta=3.0, weight_decay=0.0)
    old["train"].update(schedule="pipelined", start_after=7, sync_every=3)
    old["optimizer"] = {"name": "sgd", "lr": 0.1}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    config = load_experiment(str(path))
    assert config.model.schedule == "pipelined" and config.model.start_after == 7
    assert config.data.source == "face_mix" and not hasattr(config.data, "yfcc_tags_any")
    rica = yaml.safe_load(builtin_text("natural-patches-rica"))
    rica["train"]["schedule"] = "pipelined"
    path.write_text(yaml.safe_dump(rica))
    with pytest.raises(Exception, match="train.schedule is now model.schedule"):
        load_experiment(str(path))


def test_adding_a_learner_is_one_registration():
    for kind, learner in LEARNERS.items():
        assert learner.kind == kind
        assert learner.section.model_fields["kind"].default == kind
        assert learner.objectives
    for name, source in SOURCES.items():
        assert source.section.model_fields["source"].default == name


def _dispatches(tree: ast.AST) -> list[str]:
    """``x.model.kind == ...``, ``x.source == ...``, ``x.objective.kind in ...``: branches
    on a learner, a data source or an objective."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            if not isinstance(side, ast.Attribute):
                continue
            owner = side.value.attr if isinstance(side.value, ast.Attribute) else getattr(side.value, "id", "")
            if side.attr == "source" or (side.attr == "kind" and owner in ("model", "objective")):
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_kind_or_source_dispatch_outside_the_registry_and_the_table():
    allowed = {PACKAGE / "data" / "sources.py"}
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path in allowed or (PACKAGE / "learners") in path.parents:
            continue
        found = _dispatches(ast.parse(path.read_text()))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders


def test_the_dispatch_check_finds_a_branch():
    assert _dispatches(ast.parse("if config.model.kind == 'rica': pass"))
    assert _dispatches(ast.parse("ok = data.source in ('a', 'b')"))


def test_the_configuration_reference_is_current():
    committed = (PACKAGE.parent / "docs" / "config.md").read_text()
    assert committed == markdown(), "regenerate: python -m terabrain.config.reference > docs/config.md"
