"""A clean stop on Ctrl-C for a batch job run in this process (Beam's in-process runner).

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be; inside a bundle Beam turns it
into a ``RuntimeError`` and whatever the bundle had staged since its last commit is lost. Instead, while
:func:`handling_sigint` is active, the first SIGINT only sets a flag; the scoring step calls
:func:`stop_if_requested` before it takes the next row, which runs the registered ``before stop`` callbacks
on that thread (the sink commits every row it has written: :mod:`transforms.sink`) and raises
:class:`Interrupted`. A second SIGINT interrupts at once, as Python would.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

_REQUESTED = threading.Event()
_BEFORE_STOP: list[Callable[[], None]] = []


class Interrupted(Exception):
    """Raised inside the job once a SIGINT was received: the rows finished before it are committed."""


def requested() -> bool:
    """Whether a SIGINT arrived while :func:`handling_sigint` was active (in this process)."""
    return _REQUESTED.is_set()


def before_stop(callback: Callable[[], None]) -> None:
    """Run ``callback`` (once per stop, on the thread that stops) before :class:`Interrupted` is raised."""
    if callback not in _BEFORE_STOP:
        _BEFORE_STOP.append(callback)


def stop_if_requested() -> None:
    """Raise :class:`Interrupted` (after the ``before stop`` callbacks) when a SIGINT was received."""
    if not _REQUESTED.is_set():
        return
    for callback in list(_BEFORE_STOP):
        callback()
    raise Interrupted("interrupted (Ctrl-C)")


@contextlib.contextmanager
def handling_sigint() -> Iterator[None]:
    """While active (main thread only; elsewhere a no-op), the first SIGINT sets the flag, a second one raises
    ``KeyboardInterrupt``. The flag is cleared on entry; the previous handler comes back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _REQUESTED.clear()

    def on_sigint(signum: int, frame: object) -> None:
        if _REQUESTED.is_set():
            raise KeyboardInterrupt
        _REQUESTED.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
