"""The project's error types: every bad input ends in one of these, naming the file."""


class LggUnetError(Exception):
    """Base class for lggunet's own errors."""


class DataError(LggUnetError):
    """Bad or missing input data; the message names the file and the problem."""


class ConfigError(LggUnetError):
    """A config that cannot work; raised before any work starts."""


class TrainingDiverged(LggUnetError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class InputError(LggUnetError, ValueError):
    """Arrays given to the Python API that the model cannot take; the message says what it
    expected."""
