"""Whether a process still runs, from its pid (Linux; elsewhere a live pid counts as running)."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
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
