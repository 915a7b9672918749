"""Process lifetime: child processes die with their parent; signals end a command cleanly.

``esma run`` starts a notebook kernel, which starts executor worker processes (each several
hundred MB).  When the run is killed (SIGTERM, SIGKILL, a closed terminal), nothing of it may
live on and go on writing results.  On Linux each child asks the kernel for a *parent-death
signal* (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): when its parent process ends, however it ends,
the child is killed too, so killing ``esma run`` takes down the kernel, which takes down its
workers.  Elsewhere the children fall back on their own checks (ipykernel polls its parent;
the process pool's teardown terminates its workers).

SIGTERM in the ``esma`` command is turned into :class:`Terminated` (a
:class:`KeyboardInterrupt`), so the same clean-up as for Ctrl-C runs, and the command ends with
one line and exit code 143 (130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from types import FrameType

__all__ = [
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "Terminated",
    "die_with_parent",
    "handle_termination",
    "interrupted_exit_code",
]

log = logging.getLogger(__name__)

#: Exit codes of a command ended by Ctrl-C (SIGINT) and by SIGTERM (128 + signal number).
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
_PR_SET_PDEATHSIG = 1


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (handled like Ctrl-C, exit code 143)."""


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent ends.

    Parameters
    ----------
    parent_pid : int, optional
        The parent this process was started by.  If it is already gone (the parent died
        before this call), this process exits at once.
    sig : int
        The signal to receive (default SIGKILL: no clean-up, results are written atomically).

    Returns
    -------
    bool
        True when the parent-death signal is set (Linux), False elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # pragma: no cover - no libc / no prctl
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(128 + int(sig))  # the parent died before the signal was armed
    return True


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def handle_termination() -> None:
    """Turn SIGTERM into :class:`Terminated` in this (main) thread's Python code."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave the default
        log.debug("SIGTERM handler not installed (not the main thread)")


def interrupted_exit_code(exc: BaseException) -> int:
    """143 for :class:`Terminated` (SIGTERM), 130 for any other KeyboardInterrupt."""
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
