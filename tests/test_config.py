"""Experiment configs: built-ins load, overrides apply, bad input is one clear message, exit 2."""

import pytest
import yaml

from terabrain.config.loader import builtin_names, load_experiment, to_yaml
from terabrain.errors import ConfigError


def test_builtins_validate_and_round_trip_through_yaml(tmp_path):
    for name in builtin_names():
        config = load_experiment(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(config))
        assert load_experiment(str(path)) == config


def test_default_experiment_is_natural_patches_rica():
    assert load_experiment(None).name == "natural-patches-rica"


def test_overrides_parse_yaml_values():
    config = load_experiment(
        None, ["optimizer.lr=0.01", "model.hidden=256", "train.batch_size=null", "data.photos=[camera]"]
    )
    assert config.optimizer.lr == 0.01
    assert config.model.hidden == 256
    assert config.train.batch_size is None
    assert config.data.photos == ["camera"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("model.hiden=3", "model.hiden: unknown key"),
        ("optimizer.name=foo", "allowed: 'sgd', 'adagrad', 'rmsprop', 'adam', 'adamw' or 'lbfgs'"),
        ("train.steps=abc", "train.steps"),
        ("data.photos=[nowhere]", "data.photos: unknown photograph"),
        ("objective.kind=sparse_autoencoder", "allowed: rica"),
        (["optimizer.name=sgd", "optimizer.nesterov=true"],
         "optimizer.nesterov needs optimizer.momentum > 0"),
        ("optimizer.nesterov=true", "nesterov applies only when name is sgd, and name is lbfgs"),
        ("model.dropout=1.5", "model.dropout"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=None) as error:
        load_experiment(None, override if isinstance(override, list) else [override])
    assert expected in str(error.value)


def test_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="data.path: file not found"):
        load_experiment(None, ["data.source=npy", f"data.path={tmp_path / 'x.npy'}"])


def test_malformed_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_experiment(str(bad))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--set", "optimizer.lr=-1"], "optimizer.lr"),
        (["train", "--set", "model.hiden=3"], "model.hiden"),
        (["train", "missing.yaml"], "missing.yaml"),
        (["train", "--resume", "/nonexistent-run"], "not a run directory"),
        (["train", "no-such-builtin"], f"`terabrain configs` lists all {len(builtin_names())}"),
        (["train", "faces-rca"], "did you mean faces-rica"),
        (["show", "natural-patches-rica", "--set", "optimizer=3"], "optimizer"),
    ],
)
def test_cli_reports_bad_input_with_exit_code_2_and_no_traceback(cli, args, expected):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_configs_and_show(cli):
    listing = cli("configs", check=True).stdout.splitlines()
    assert [line.split()[0] for line in listing] == builtin_names()
    shown = yaml.safe_load(cli("show", "digits-sae", check=True).stdout)
    assert shown["objective"]["kind"] == "sparse_autoencoder"
    assert shown["supervised"]["task"] == "classification"


def test_set_reaches_into_lists_by_index():
    config = load_experiment("yfcc-15b-small", ["model.layers.0.steps=7", "model.layers.2.maps=32"])
    assert config.model.layers[0].steps == 7 and config.model.layers[2].maps == 32
    with pytest.raises(ConfigError, match=r"model.layers.5: index out of range; the list has 3"):
        load_experiment("yfcc-15b-small", ["model.layers.5.steps=1"])


@pytest.mark.parametrize("content, named", [
    (b"", "the file is empty"),
    (bytes(range(128, 256)), "not a text (UTF-8) file"),
    (b"model:\n  kind: rica\n  kind: deep\n", "duplicate key 'kind'"),
    (b"a: [1,\n", "not valid YAML"),
])
def test_hostile_experiment_files_end_in_one_line(tmp_path, capsys, content, named):
    from terabrain.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_bytes(content)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("terabrain: error:") and named in err[0], err
