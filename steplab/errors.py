"""Errors that reach the user as one clear line (what was wrong, where, what to do)."""


class StepLabError(Exception):
    """Base class: the CLI prints the message and exits non-zero, without a traceback."""


class ConfigError(StepLabError):
    pass


class DataError(StepLabError):
    pass


class CheckpointError(StepLabError):
    pass


class FitError(StepLabError):
    pass
