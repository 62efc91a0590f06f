"""One exception family for mistakes a user can fix.

The CLI prints these as a one-line ``error: ...`` message instead of a traceback; anything
else is a bug and keeps its traceback.
"""


class SafemergeError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


class ConfigError(SafemergeError, ValueError):
    """An argument or configuration value is invalid."""


class UnknownTaskError(ConfigError, KeyError):
    """A task name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DatasetNotFoundError(SafemergeError, FileNotFoundError):
    """A dataset is not where the task expects it."""


class WeightsUnavailableError(SafemergeError, RuntimeError):
    """Model weights cannot be obtained (offline, or not provided locally)."""


class UnsafeCheckpointError(SafemergeError):
    """A checkpoint would need arbitrary code to load, so it is refused."""


class CheckpointError(SafemergeError):
    """A checkpoint or expert directory is missing, corrupt or inconsistent."""
