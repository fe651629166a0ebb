"""Errors that the command line reports as one message, without a traceback."""


class ConfigError(Exception):
    """Bad usage or configuration: exit code 2. The message names the field."""


class TrainingError(Exception):
    """A run that cannot go on (diverged, interrupted data): exit code 1."""
