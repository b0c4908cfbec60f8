"""The one base of every error a user can fix, and the errors that modules on several floors raise.

`cli.py` catches `VaedecError` and prints its message (no traceback, exit code 1); each module's own error
class (ConfigError, CheckpointError, VAELoadError, ...) subclasses it, so a message says where it comes from
while the CLI catches one thing. This module imports nothing of vaedec, so any module may raise these.
"""

from __future__ import annotations


class VaedecError(ValueError):
    """A mistake the user can fix; the message says what and how. A ValueError, as each of these was
    before."""


class ShardError(VaedecError):
    """A shard folder is missing, foreign or inconsistent; the message says which file and why."""


class ShardUnreachable(ShardError):
    """A file of remote SHARDS could not be fetched (HTTP error, no connection, a pipe: command that failed):
    not damage in the data, so training stops on it even with data.on_bad_sample=skip, as for a missing local
    shard."""


class TrainError(VaedecError):
    """The run cannot start as configured; the message says what to change."""
