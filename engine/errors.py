"""The errors a user can act on, and the exit code each kind ends a recipe with.

Everything raised as a `QforgeError` is the user's to fix (a config key, a data row, a damaged checkpoint,
a run that diverged): recipes print its message as one line and exit with its `exit_code`. Anything else is
an internal error (exit 1) and keeps its traceback. 143 (SIGTERM/SIGINT: checkpoint saved, resumable) is
the trainer's own.
"""
from __future__ import annotations


class QforgeError(Exception):
    """An error whose message says what is wrong, where (file:line, key) and what to do."""
    exit_code = 1


class ConfigError(QforgeError, ValueError):
    """A config file, key or value that does not fit (unknown key, wrong type, out of its domain)."""
    exit_code = 2


class DataError(QforgeError, ValueError):
    """Training/evaluation data that cannot be used as it is (names file:line:field)."""
    exit_code = 3


class CheckpointError(QforgeError, ValueError):
    """A model or training checkpoint that is missing, damaged or does not match the config."""
    exit_code = 4


class TrainingError(QforgeError, RuntimeError):
    """A run that cannot produce sound weights (non-finite loss/weights, nothing to train on)."""
    exit_code = 5


class EndpointError(QforgeError, RuntimeError):
    """A model endpoint that failed for good (after retries) or answered in a way the recipe cannot use."""
    exit_code = 6


class StorageError(QforgeError, OSError):
    """Writing a checkpoint or an export failed midway (disk full, a directory that stopped being writable); what
    was being written is removed, earlier checkpoints and final/ are kept."""
    exit_code = 7


class SetupError(QforgeError, RuntimeError):
    """Installed software that cannot run this path (a torch below the floor, a shadowed package)."""
    exit_code = 8


EXIT_CODES = {cls.__name__: cls.exit_code for cls in (ConfigError, DataError, CheckpointError, TrainingError,
                                                       EndpointError, StorageError, SetupError)}
