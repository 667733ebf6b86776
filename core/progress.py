"""Progress reporting for long work, without any UI dependency.

Core functions accept ``progress: ProgressFn | None``. They call it as ``progress(done, total, label)``
after each unit of work (usually one layer). The callback may raise to cancel (ComfyUI's ProgressBar
does, via its interrupt check; the command line raises :class:`~.errors.Cancelled` on Ctrl-C).
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int, str], None]


def report(progress: Optional[ProgressFn], done: int, total: int, label: str = "") -> None:
    if progress is not None:
        progress(done, total, label)
