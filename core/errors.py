"""Errors raised by the core. Each message names what is wrong and, where it can, what to do."""

from __future__ import annotations


class RankwiseError(ValueError):
    """Base class: bad input that the user can fix."""


class FormatError(RankwiseError):
    """A file or state dict is not in a format Rankwise can read (names the keys or the cause)."""


class MismatchError(RankwiseError):
    """Two inputs that must agree (architecture, keys, shapes) do not; the message lists what differs."""


class NonFiniteError(RankwiseError):
    """A tensor holds NaN or Inf; ``names`` lists the offending tensors/layers."""

    def __init__(self, message: str, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.names = tuple(names)


class UnsafePathError(RankwiseError):
    """A write would overwrite an input file or an existing file without permission."""


class Cancelled(Exception):
    """Raised through a progress callback to stop long work; no partial output is left behind."""


class OutputError(RankwiseError):
    """An output could not be written: an OS error (names the path and the reason), or another process
    created the file while this run was writing."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the command line's handler (a KeyboardInterrupt, so every
    ``finally`` that cleans up after Ctrl-C also runs for it)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
