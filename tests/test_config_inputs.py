"""Every configuration input either validates or ends with exit code 2 and one bounded line
naming the field: hostile files, YAML tricks, `--set` strings, strict numbers, limits, and a
memory estimate that refuses experiments too large for this machine before allocating."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from terabrain.capacity.fits import check_fits_this_machine
from terabrain.cli import main
from terabrain.config.loader import builtin_names, load_experiment
from terabrain.errors import ConfigError

LIMIT = 300


def terabrain(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert len(lines[0]) <= LIMIT, lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("assignment, field", [
    ("model.hidden=true", "model.hidden"),
    ("model.hidden=false", "model.hidden"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.lr=-.inf", "optimizer.lr"),
    ("optimizer.lr=.nan", "optimizer.lr"),
    ("seed=1000000000000000000000000000000", "seed"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("parallel.timeout_s=.inf", "parallel.timeout_s"),
    ("parallel.timeout_s=1e12", "parallel.timeout_s"),
    ("train.steps=100000000000000000000000", "train.steps"),
    ("data.patch_size=true", "data.patch_size"),
    ("train.progress=1", "train.progress"),
    ("data.remove_mean=0", "data.remove_mean"),
    ("model.hidden='12'", "model.hidden"),
    ("optimizer.lr='0.01'", "optimizer.lr"),
    ("..=1", "empty field name"),
    ("a..b=1", "a..b"),
    (".=1", "empty field name"),
    ("=1", "KEY=VALUE"),
    ("model.hidden", "KEY=VALUE"),
    ("model.hidden=" + "[" * 5000, "model.hidden"),
    ("model.hidden=&a [*a]", "alias"),
])
def test_bad_set_values_are_one_line_naming_the_field(capsys, assignment, field):
    code, _, err = terabrain(capsys, "show", "natural-patches-rica", "--set", assignment)
    assert_one_line_error(code, err, field)


def test_limits_allow_the_values_users_write(capsys):
    for assignment, expected in (("seed=4294967295", 4294967295), ("seed=0", 0),
                                 ("parallel.timeout_s=86400", 86400), ("optimizer.lr=0.001", 0.001),
                                 ("model.hidden=12", 12), ("train.progress=false", False),
                                 ("train.batch_size=null", None), ("optimizer.lr=1e-3", 0.001),
                                 ("optimizer.lr=2E-4", 0.0002)):
        code, out, err = terabrain(capsys, "show", "natural-patches-rica", "--set", assignment)
        assert code == 0, err
        key = assignment.split("=")[0]
        section, _, name = key.rpartition(".")
        parsed = yaml.safe_load(out)
        assert (parsed[section][name] if section else parsed[name]) == expected


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_yaml_syntax_errors_give_line_and_column(tmp_path, capsys):
    source = write(tmp_path, "bad.yaml", "name: x\nmodel:\n  kind: rica\n  hidden: [1, 2\nseed: 1\n")
    code, _, err = terabrain(capsys, "show", source)
    line = assert_one_line_error(code, err, f"{source}:5:5:", "not valid YAML")
    assert "^" not in line  # no multi-line snippet folded into the line


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 25):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    lines.append("model: {kind: rica, hidden: *a24}")
    text = "\n".join(lines) + "\n"
    assert len(text) < 3000
    source = write(tmp_path, "bomb.yaml", text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    code, _, err = terabrain(capsys, "show", source)
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    assert_one_line_error(code, err, source, "aliases")


def test_a_self_referencing_alias_is_refused(tmp_path, capsys):
    source = write(tmp_path, "loop.yaml", "model: &m\n  kind: rica\n  hidden: *m\n")
    code, _, err = terabrain(capsys, "show", source)
    assert_one_line_error(code, err, "alias refers to itself")


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text"),
    ("\x00\x01\x02", "not valid YAML"),
    ("- 1\n- 2\n", "YAML mapping"),
    ("model: {kind: rica, hidden: " + "9" * 500 + "}\n", "model.hidden"),
])
def test_hostile_experiment_files(tmp_path, capsys, content, needle):
    code, _, err = terabrain(capsys, "show", write(tmp_path, "exp.yaml", content))
    assert_one_line_error(code, err, needle)


def test_a_fifo_or_a_huge_file_as_experiment_does_not_hang(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.yaml")
    code, _, err = terabrain(capsys, "show", str(tmp_path / "pipe.yaml"))
    assert_one_line_error(code, err, "not found")
    with open(tmp_path / "big.yaml", "wb") as stream:
        stream.truncate(50 * 2**20)
    code, _, err = terabrain(capsys, "show", str(tmp_path / "big.yaml"))
    assert_one_line_error(code, err, "bytes")


def test_a_model_too_large_for_this_machine_is_refused_before_allocating(tmp_path, capsys):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = terabrain(capsys, "train", "natural-patches-rica", "--out",
                             str(tmp_path / "run"), "--set", "model.hidden=10000000000000")
    assert_one_line_error(code, err, "model.hidden=10000000000000", "more than this machine")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
    assert not (tmp_path / "run").exists()
    code, _, err = terabrain(capsys, "train", "natural-patches-rica", "--out",
                             str(tmp_path / "run"), "--set", "data.num_patches=1000000000000")
    assert_one_line_error(code, err, "data.num_patches=1000000000000")


def test_a_model_too_large_for_a_64_bit_size_is_one_line_in_train_and_plan(tmp_path, capsys):
    # Found by the random --set test: 7.5e14 hidden units x 3,072 inputs overflow torch's
    # storage size even on the meta device, before any memory estimate can be made.
    hidden = "model.hidden=750599937895083"
    code, _, err = terabrain(capsys, "train", "lbann-ae-small", "--out", str(tmp_path / "run"),
                             "--set", hidden)
    assert_one_line_error(code, err, hidden, "64-bit")
    assert not (tmp_path / "run").exists()
    code, _, err = terabrain(capsys, "plan", "lbann-ae-small", "--gpus", "2",
                             "--gpu-memory", "80GB", "--set", hidden)
    assert_one_line_error(code, err, hidden, "64-bit")


def test_a_patch_larger_than_every_photograph(tmp_path, capsys):
    code, _, err = terabrain(
        capsys, "train", "natural-patches-rica", "--out", str(tmp_path / "run"),
        "--set", "data.patch_size=700", "--set", "data.num_patches=10",
        "--set", "data.holdout_patches=10", "--set", "data.whitening=none")
    assert_one_line_error(code, err, "data.patch_size", "512x512")


@pytest.mark.parametrize("name", builtin_names())
def test_plan_works_for_every_builtin_and_every_source(capsys, name):
    code, _, err = terabrain(capsys, "plan", name, "--gpus", "4", "--gpu-memory", "80GB")
    assert code == 0, err
    for source in ("photos", "digits", "face_mix", "lfw", "fashion-mnist"):
        code, _, err = terabrain(capsys, "plan", name, "--gpus", "2", "--gpu-memory", "80GB",
                                 "--set", f"data={{source: {source}}}")
        assert code in (0, 2), err
        if code == 2:
            assert_one_line_error(code, err)


# --- property-based: random --set strings and random files ----------------------------------

FIELDS = ["seed", "name", "device", "precision", "model.kind", "model.hidden", "model.dropout",
          "data.source", "data.patch_size", "data.num_patches", "data.holdout_patches",
          "data.whitening", "data.whitening_epsilon", "data.photos", "data.photos.0",
          "optimizer.name", "optimizer.lr", "optimizer.max_iter", "train.steps",
          "train.batch_size", "train.log_every", "train.checkpoint_every", "parallel.data",
          "parallel.model", "parallel.timeout_s", "parallel.mode", "objective.kind",
          "objective.sparsity_weight", "supervised", "supervised.task", "data", "model"]
VALUES = ["true", "false", "null", "~", ".inf", "-.inf", ".nan", "0", "-1", "1", "3", "12",
          "1e308", "-1e308", "10000000000000", "1000000000000000000000000000000", "0.5",
          "[]", "{}", "[1, 2]", "{kind: rica}", "{source: digits}", "rica", "photos", "'1'",
          "&a [*a]", "*a", "[", "{", "!!python/object:os.system", "\x00", "é", "..", "=",
          "{a: 1, a: 2}", "- x", "0x10", "1_000", "2.5e-3", "'" + "x" * 400 + "'"]

values = st.one_of(st.sampled_from(VALUES), st.text(max_size=40),
                   st.integers().map(str), st.floats().map(repr))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=20),
                 st.lists(st.sampled_from(["model", "data", "", "0", "x", "hidden"]),
                          min_size=1, max_size=4).map(".".join))
assignments = st.one_of(st.tuples(keys, values).map("=".join), st.text(max_size=60))


def _check_outcome(code: int, out: str, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and len(lines[0]) <= LIMIT, err


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(["natural-patches-rica", "digits-sae", "faces-deep",
                             "lbann-ae-small"]),
       overrides=st.lists(assignments, max_size=3))
def test_random_set_strings_validate_or_give_one_line(capsys, name, overrides):
    args = [item for assignment in overrides for item in ("--set", assignment)]
    _check_outcome(*terabrain(capsys, "show", name, *args))
    try:
        config = load_experiment(name, overrides)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    try:
        check_fits_this_machine(config, 1, 1)
    except ConfigError as error:
        assert len(str(error)) <= LIMIT
    _check_outcome(*terabrain(capsys, "plan", name, "--gpus", "2", "--gpu-memory", "80GB", *args))


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(max_size=20))
yaml_trees = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(FIELDS + ["kind", "hidden",
                                                                         "source", "x"]),
                                               children, max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=yaml_trees, raw=st.binary(max_size=200))
def test_random_experiment_files_validate_or_give_one_line(tmp_path, capsys, tree, raw):
    for content in (yaml.safe_dump(tree).encode(), raw):
        source = write(tmp_path, "random.yaml", content)
        _check_outcome(*terabrain(capsys, "show", source))


def test_an_in_memory_training_set_over_half_the_memory_is_refused_naming_its_fields(tmp_path):
    """natural-patches-rica holds 20,000 rows of 8x8 (5.12 MB) on every rank."""
    from terabrain.capacity.fits import check_data_fits_memory

    config = load_experiment("natural-patches-rica")
    check_data_fits_memory(config, 1, memory=11 * 10**6)  # 5.12 MB <= half of 11 MB
    with pytest.raises(ConfigError) as refused:
        check_data_fits_memory(config, 1, memory=10 * 10**6)
    message = str(refused.value)
    assert "\n" not in message and "50% of this machine's 10.0 MB" in message
    assert "data.patch_size=8" in message and "data.num_patches=20000" in message
    # Every rank on the machine holds its own copy.
    with pytest.raises(ConfigError, match="for the 2 ranks here"):
        check_data_fits_memory(config, 2, memory=20 * 10**6)
    # A streamed collection holds only its prefetch buffers.
    streamed = load_experiment("natural-patches-rica", [
        f'data={{source: folder, root: {tmp_path}, crop_size: 4000}}'])
    check_data_fits_memory(streamed, 1, memory=10**6)
