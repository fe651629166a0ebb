"""`terabrain <command>`: parse arguments, call one function per command.

Exit codes: 0 success, 2 bad usage or configuration (one message naming the field),
1 a failure during the run, 75 pre-empted (a signal in train.preempt_signals: every rank
wrote a checkpoint of the last step; the same command with --resume-if-exists continues).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from terabrain import __version__
from terabrain.errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted, TrainingError


def _train(args: argparse.Namespace) -> int:
    from terabrain.config.loader import load_experiment
    from terabrain.parallel import (
        build_mesh,
        detect_launch_env,
        fail_fast,
        init_distributed,
        shutdown_distributed,
    )
    from terabrain.parallel.launch import is_main_rank
    from terabrain.train.preemption import watch_signals
    from terabrain.train.run import default_run_dir, run_experiment
    from terabrain.train.run_directory import claim_run_directory

    env = detect_launch_env()
    with fail_fast(env):
        if args.resume_if_exists and (args.resume is not None or args.out is None):
            raise ConfigError("--resume-if-exists needs --out DIR (and no --resume): it starts "
                              "the run in DIR, or continues it if DIR already holds it")
        resuming = args.resume is not None or (
            args.resume_if_exists and (args.out / "config.yaml").is_file())
        if args.resume is not None:
            if args.experiment is not None or args.out is not None:
                raise ConfigError("--resume DIR takes the experiment and the output from DIR; "
                                  "drop the EXPERIMENT argument and --out")
            config_path = args.resume / "config.yaml"
            if not config_path.is_file():
                raise ConfigError(f"--resume: {args.resume} is not a run directory (no config.yaml)")
            config = load_experiment(str(config_path), args.set)
            run_dir = args.resume
        else:
            config = load_experiment(args.experiment, args.set)
            run_dir = args.out or default_run_dir(config)
        from terabrain.capacity.fits import (
            check_data_fits_memory,
            check_fits_this_machine,
        )

        # Before anything is allocated: a model or data set too large for this machine is a
        # one-line message naming the fields, not an allocator traceback.
        check_data_fits_memory(config, env.local_world_size)
        check_fits_this_machine(config, env.world_size, env.local_world_size)
        # Before the process group forms: a signal from here on stops the run at a step
        # boundary with a checkpoint instead of killing it.
        with watch_signals(config.train.preempt_signals):
            init_distributed(env, config.parallel.backend, config.parallel.timeout_s)
            mesh = build_mesh(config.parallel.data, config.parallel.model, env)
            run_dir = _same_on_every_rank(run_dir)
            claim = claim_run_directory(run_dir, config, resuming)
            try:
                if claim.finished:
                    if is_main_rank():
                        print(f"terabrain: {run_dir} holds this run, finished; nothing to do")
                    shutdown_distributed()
                    return 0
                if is_main_rank():
                    where = f" on {env.world_size} ranks ({env.launcher})" if env.world_size > 1 else ""
                    print(f"terabrain: {config.name} -> {run_dir}{where}")
                try:
                    results = run_experiment(config, run_dir, mesh)
                except Preempted as stop:
                    stop.run_dir = run_dir
                    raise
                if is_main_rank():
                    _print_summary(results, run_dir)
                shutdown_distributed()
            finally:
                claim.release()  # the run directory is free for the next command
    return 0


def _same_on_every_rank(run_dir: Path) -> Path:
    """Rank 0's run directory (default names carry a timestamp, which differs per rank)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return run_dir
    holder = [str(run_dir)]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def _print_summary(results: dict, run_dir: Path) -> None:
    network = results.get("network")
    if network:
        print(f"network: {network['steps']} steps, test accuracy {network['test_accuracy']:.4f}")
    features = results.get("features", {})
    final = features.get("final", {})
    if final:
        print(f"features: {features['steps']} steps, final loss {final.get('loss', float('nan')):.5g}")
    stats = features.get("filters")
    if stats:
        print(
            "filters: spatial spread {spatial_spread_px:.2f} px (random {random_spatial_spread_px:.2f}), "
            "response kurtosis {response_kurtosis:.2f} (random {random_response_kurtosis:.2f})".format(**stats)
        )
    supervised = results.get("supervised")
    if supervised and "test_accuracy" in supervised:
        print(f"supervised: test accuracy {supervised['test_accuracy']:.4f}")
    elif supervised:
        print(f"supervised: test mse {supervised['test_mse']:.5g}")
    splice = results.get("splice")
    if splice and "skipped" not in splice:
        from terabrain.analysis.splice import summary_lines

        print("\n".join(summary_lines(splice)))
    memory = results.get("memory")
    if memory:
        from terabrain.units import format_bytes

        host = ", ".join(format_bytes(b) for b in memory["peak_resident_bytes"])
        device = memory.get("peak_device_bytes")
        on_device = f"; device {', '.join(format_bytes(b) for b in device)}" if device else ""
        print(f"peak memory per rank: resident {host}{on_device} (compare: terabrain plan)")
    print(f"run directory: {run_dir} (filters.png, metrics.jsonl, tb/, results.json)")


def _launch(args: argparse.Namespace) -> int:
    """`terabrain launch --nproc N train ...`: N ranks on this machine; exits with their code."""
    import os

    from terabrain.parallel.local_launch import launch_local

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if not args.command_args or args.command_args[0] != "train":
        raise ConfigError("terabrain launch --nproc N train [EXPERIMENT] [--set ...]: "
                          "only `train` runs on several processes")
    environ = dict(os.environ)
    # Each rank gets its share of the cores instead of all of them.
    cores = os.cpu_count() or 1
    environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // args.nproc)))
    return launch_local(args.nproc, ["-m", "terabrain", *args.command_args], environ)


def _configs(args: argparse.Namespace) -> int:
    from terabrain.config.loader import describe_builtins

    entries = describe_builtins()
    width = max(len(name) for name, _ in entries)
    for name, description in entries:
        print(f"{name:<{width}}  {description}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from terabrain.config.loader import load_experiment, to_yaml

    print(to_yaml(load_experiment(args.name, args.set)), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """`terabrain plan EXPERIMENT --gpus N --gpu-memory 80GB`: memory per rank and bytes sent
    per step for every (data, model) split of N devices; the model is never allocated."""
    from terabrain.capacity import format_plan, parse_memory, plan_experiment
    from terabrain.capacity.profile import load_profile
    from terabrain.config.loader import load_experiment
    from terabrain.errors import ConfigError

    profile = load_profile(args.profile) if args.profile else None
    if args.gpu_memory is not None:
        memory = parse_memory(args.gpu_memory, "--gpu-memory")
    elif profile is not None:
        memory = profile.device_memory
    else:
        raise ConfigError("--gpu-memory: give the memory per device (80GB, ...) or a --profile")
    config = load_experiment(args.experiment, args.set)
    plan = plan_experiment(config, args.gpus, memory, batch=args.batch, headroom=args.headroom,
                           profile=profile, gpus_per_node=args.gpus_per_node,
                           dataset_size=args.dataset_size)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """`terabrain calibrate`: measure this machine (and, under a launcher, its links) and write
    a machine profile for `terabrain plan --profile`."""
    from terabrain.capacity.calibrate import calibrate_command

    return calibrate_command(args)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (exit code 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, _one_line(f"{self.prog}: error: {message} (see {self.prog} -h)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="terabrain", description="Large-scale unsupervised feature learning on PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"terabrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train an experiment (default: natural-patches-rica)")
    train.add_argument("experiment", nargs="?", help="a built-in name or an EXPERIMENT.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set optimizer.lr=0.01 (repeatable)")
    train.add_argument("--out", type=Path, help="run directory (default runs/<name>-<time>)")
    train.add_argument("--resume", type=Path, metavar="DIR",
                       help="continue the run in DIR from its last checkpoint")
    train.add_argument("--resume-if-exists", action="store_true",
                       help="with --out DIR: continue the run in DIR if there is one, else start "
                       "it (a requeued batch job runs the same command again)")
    train.set_defaults(handler=_train)

    launch = commands.add_parser(
        "launch", help="run `train` on N local processes (ranks); exits with their code",
        description="terabrain launch --nproc 4 train natural-patches-rica --set parallel.model=2",
    )
    launch.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start")
    launch.add_argument("command_args", nargs=argparse.REMAINDER, metavar="train ...")
    launch.set_defaults(handler=_launch)

    configs = commands.add_parser("configs", help="list the built-in experiments")
    configs.set_defaults(handler=_configs)

    show = commands.add_parser("show", help="print a built-in experiment as YAML")
    show.add_argument("name", help="a built-in name or an EXPERIMENT.yaml")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(handler=_show)

    plan = commands.add_parser(
        "plan", help="memory per rank and traffic per step for each (data, model) split",
        description="terabrain plan lbann-ae-50k --gpus 8 --gpu-memory 80GB",
    )
    plan.add_argument("experiment", nargs="?", help="a built-in name or an EXPERIMENT.yaml")
    plan.add_argument("--gpus", type=int, required=True, metavar="N",
                      help="devices (ranks) to split the experiment over")
    plan.add_argument("--gpu-memory", metavar="SIZE",
                      help="memory per device: 80GB (10^9 bytes), 80GiB (2^30), 512MB, ... "
                           "(default: the profile's)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field, e.g. --set model.hidden=100000 (repeatable)")
    plan.add_argument("--batch", type=int, metavar="N",
                      help="global batch size (default: train.batch_size)")
    plan.add_argument("--headroom", type=float, default=0.9,
                      help="fraction of the device memory the plan may use (default 0.9)")
    plan.add_argument("--profile", metavar="PROFILE",
                      help="a machine profile (YAML from `terabrain calibrate`, or built-in: "
                           "h100-sxm, h200, a100-80gb, llnl-edge, llnl-catalyst, cots-hpc): "
                           "adds the predicted step time of every split")
    plan.add_argument("--gpus-per-node", type=int, metavar="G",
                      help="ranks per node (default: the profile's)")
    plan.add_argument("--dataset-size", type=int, metavar="N",
                      help="examples per epoch, for the time per epoch (default: the training "
                           "rows when the source knows them)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_plan)

    calibrate = commands.add_parser(
        "calibrate", help="measure this machine and write a profile for `plan --profile`",
        description="terabrain calibrate --out profile.yaml; under torchrun/srun/mpirun with "
                    "N ranks it also measures the links between them (real collectives)",
    )
    calibrate.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    calibrate.add_argument("--out", type=Path, default=Path("profile.yaml"), metavar="PATH",
                           help="where to write the profile (default profile.yaml)")
    calibrate.add_argument("--name", help="the profile's name (default: this host's)")
    calibrate.add_argument("--quick", action="store_true",
                           help="fewer shapes and repeats (seconds instead of a minute)")
    calibrate.add_argument("--repeats", type=int, default=1, metavar="N",
                           help="measure everything N times, one after the other, and keep each "
                                "figure's median (for machines whose speed moves, such as shared "
                                "VMs; N times as long)")
    calibrate.set_defaults(handler=_calibrate)

    from terabrain.analysis.commands import add_parsers as add_analysis_parsers
    from terabrain.data.commands import register as register_data

    register_data(commands)
    add_analysis_parsers(commands)
    return parser


MESSAGE_LIMIT = 300


def _one_line(text: str) -> str:
    """Messages are one line of bounded length, whatever input they quote."""
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command in `argv` (default: this process's arguments); the exit code.

    Process-wide settings that the library leaves alone are made here, for the command only."""
    # DCP warns on every single-process checkpoint save and load; that is how this toolkit
    # runs on a laptop.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = argv  # as typed: `terabrain analyze` quotes it in its report
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ConfigError as error:
        print(_one_line(f"terabrain: error: {error}"), file=sys.stderr)
        return 2
    except Preempted as stop:
        print(_one_line(f"terabrain: {stop}"), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except TrainingError as error:
        print(_one_line(f"terabrain: run failed: {error}"), file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a quota, a vanished mount: one line, the path
        where = f"{error.filename}: " if error.filename else ""
        print(_one_line(f"terabrain: run failed: {where}{error.strerror or error}"), file=sys.stderr)
        return 1
    except MemoryError:
        print("terabrain: run failed: out of memory; `terabrain plan` estimates what an "
              "experiment needs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("terabrain: interrupted; resume with `terabrain train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
