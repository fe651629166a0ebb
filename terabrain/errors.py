"""Errors that the command line reports as one message, without a traceback."""


class ConfigError(Exception):
    """Bad usage or configuration: exit code 2. The message names the field."""


class SharedConfigError(ConfigError):
    """A ConfigError that every rank raises together, with the same message (rank 0 decided
    and told the others): reported once, by rank 0."""


class TrainingError(Exception):
    """A run that cannot go on (diverged, interrupted data): exit code 1."""


# The exit code of a pre-empted run (EX_TEMPFAIL from sysexits.h, "try again later"): a
# checkpoint of the last step was written and the same command continues the run.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """A watched signal (train.preempt_signals) stopped the run at a step boundary after
    every rank wrote the checkpoint of ``step``: exit code PREEMPTED_EXIT_CODE."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(signal_name, step)
        self.signal_name = signal_name
        self.step = step
        self.run_dir = None  # set by the command line, which knows it

    def __str__(self) -> str:
        run_dir = self.run_dir if self.run_dir is not None else "RUN_DIR"
        return (f"pre-empted by {self.signal_name}: checkpoint of step {self.step} written; "
                f"continue with `terabrain train --resume {run_dir}` or the same command with "
                f"--resume-if-exists (exit code {PREEMPTED_EXIT_CODE})")
