"""Processes the product starts: whether one still runs, and children that end with their parent.

Linux first: PR_SET_PDEATHSIG makes the kernel signal a child the moment its parent dies, even
by SIGKILL. Elsewhere (or if prctl fails) a thread watching getppid does the same within a
second.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PARENT_ENV = "KHALA_PARENT_PID"
"""Set by a command in the environment of a child it starts and owns (see stop_with_parent)."""

STOP_GRACE_S = 8.0
"""How long a child has, after its parent died, to stop cleanly before it is killed."""

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether a process still runs, from its pid (Linux; elsewhere a live pid counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    # A zombie still answers kill(0); it has exited, it just waits for its parent to reap it.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    state = stat_line.rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"]


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process dies.

    Checks after prctl that the parent is still the one that forked it: if the parent died in
    between, the kernel will never send the signal, so the child ends at once.
    """
    prctl = _prctl()  # loaded before the fork, not inside the child
    parent = os.getpid()

    def in_child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


def stop_with_parent(parent_pid: int, *, grace_s: float = STOP_GRACE_S) -> None:
    """Make this process stop by itself when `parent_pid`, the process that started it, dies.

    SIGTERM comes at once from the kernel on Linux; a daemon thread watching getppid sends it
    where prctl is missing, and in any case sends SIGKILL if the process still runs `grace_s`
    after its parent died. Returns at once; call it early, before the work starts.
    """
    prctl = _prctl()
    kernel_signals = prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # died before prctl: the kernel will not tell
        kernel_signals = False

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        if not kernel_signals:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
