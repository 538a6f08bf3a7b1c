"""The embedded broker shared by every command on one broker home, and gone after the last.

Files in the home (``KHALA_BROKER_HOME/broker``):

- ``data/``: noida-db's data; noida-db holds an exclusive lock on ``data/broker.lock`` while it
  runs, so a second broker on the same data cannot start (local_broker.start_local_broker).
- ``users.lock``: a command using the broker holds a shared flock on it for as long as it does.
  The kernel drops that lock when the command exits, however it exits, kill -9 included.
- ``broker.pid``: ``NOIDA_PID PORT KEEPER_PID`` once the broker answers.
- ``broker.log``: noida-db's output, and the keeper's.

The keeper (``python -m khala_stream.broker.keeper HOME``) is a small process of its own
session: it starts noida-db (which dies with it) and stops it when no command has held
``users.lock`` for ``idle_s`` seconds, or at once on SIGTERM, which the last command sends when
it leaves cleanly. So a broker outlives the last command using it by at most ``idle_s`` (that
command was killed) and usually not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from khala_stream.broker.local_broker import (
    BrokerBusy,
    data_dir_in_use,
    find_broker_binary,
    running_broker,
    start_local_broker,
)
from khala_stream.errors import RuntimeFailure
from khala_stream.processes import pid_alive

__all__ = ["shared_broker"]

logger = logging.getLogger(__name__)

BUSY_EXIT = 3
"""The keeper's exit code when another broker already runs on the data folder."""
_CHECK_S = 1.0
_POLL_S = 0.1
_MODULE = "khala_stream.broker.keeper"


def _paths(home: Path) -> tuple[Path, Path, Path, Path]:
    return home / "data", home / "users.lock", home / "broker.pid", home / "broker.log"


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _claim_if_unused(users: Path) -> int | None:
    """An fd holding `users` exclusively if no command holds it; None while one does."""
    fd = _open_lock(users)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# -- the keeper process ----------------------------------------------------------------------


def serve(home: Path, idle_s: float) -> int:
    """Run noida-db on `home` until it has had no user for `idle_s` seconds, or SIGTERM/SIGINT."""
    data, users, pid_file, log_path = _paths(home)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        broker = start_local_broker(data, log_path=log_path, with_parent=True)
    except BrokerBusy:
        return BUSY_EXIT
    except RuntimeError as exc:
        print(f"khala-stream broker keeper: {exc}", file=sys.stderr)
        return 1
    written = f"{broker.pid} {broker.port} {os.getpid()}\n"
    temporary = pid_file.with_suffix(".tmp")
    temporary.write_text(written)
    temporary.replace(pid_file)  # readers never see half a line
    claim: int | None = None  # held while stopping for want of users: none can attach meanwhile
    try:
        idle_since: float | None = None
        next_check = 0.0
        while not stopping and broker.is_running():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _CHECK_S
                unused = _claim_if_unused(users)
                if unused is None:
                    idle_since = None
                elif idle_since is not None and now - idle_since >= idle_s:
                    claim = unused
                    break
                else:
                    if idle_since is None:
                        idle_since = now
                    os.close(unused)
            time.sleep(_POLL_S)
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text() == written:
                pid_file.unlink()
        broker.stop(timeout=20.0)
        if claim is not None:
            os.close(claim)
    return 0


def _main(argv: list[str]) -> int:
    home, idle_s = Path(argv[0]), float(argv[1])
    return serve(home, idle_s)


# -- a command using the broker --------------------------------------------------------------


@contextlib.asynccontextmanager
async def shared_broker(home: Path, *, idle_s: float, timeout: float = 120.0) -> AsyncIterator[str]:
    """The bootstrap address of the broker on `home`, started if none runs, held while inside.

    Leaving as the last user stops the broker (its keeper saves the snapshot); leaving any other
    way (killed) lets the keeper stop it after `idle_s` seconds without users.
    """
    find_broker_binary()  # a missing noida-db is this command's usage error, not the keeper's
    home = home.resolve()  # the keeper may outlive this command's working directory
    home.mkdir(parents=True, exist_ok=True)
    lease = _open_lock(_paths(home)[1])
    try:
        await _flock(lease, fcntl.LOCK_SH)
        spawned: list[subprocess.Popen[bytes]] = []
        try:
            yield await _attach(home, idle_s, timeout, spawned)
        finally:
            await _leave(lease, home, spawned)
    finally:
        os.close(lease)


async def _flock(fd: int, operation: int) -> None:
    # Polled rather than blocking, so that a signal's cancellation is not held up.
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(_POLL_S)


async def _attach(
    home: Path, idle_s: float, timeout: float, spawned: list[subprocess.Popen[bytes]]
) -> str:
    data, _, pid_file, log_path = _paths(home)
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(running_broker, pid_file)
        if found is not None:
            return found
        keeper = spawned[-1] if spawned else None
        code = keeper.poll() if keeper is not None else None
        if code not in (None, 0, BUSY_EXIT):
            raise RuntimeFailure(
                f"the embedded Kafka broker did not start (exit {code}); see {log_path}"
            )
        if (keeper is None or code is not None) and not data_dir_in_use(data):
            spawned.append(_spawn_keeper(home, idle_s, log_path))
        if time.monotonic() >= deadline:
            raise RuntimeFailure(
                f"the embedded Kafka broker on {data} did not answer within {timeout:.0f}s;"
                f" see {log_path}"
            )
        await asyncio.sleep(_POLL_S)


def _spawn_keeper(home: Path, idle_s: float, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", _MODULE, str(home), str(idle_s)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # shared: not stopped by a Ctrl-C aimed at one command
        )


async def _leave(lease: int, home: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    """Stop the keeper if no other command uses the broker.

    The exclusive lock taken here keeps new commands waiting until the broker is gone; they
    then start a new one rather than attach to one that is stopping.
    """
    try:
        fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # other commands still use it
    pid = _keeper_pid(_paths(home)[2])
    pids = {pid} if pid is not None else set()
    pids |= {keeper.pid for keeper in spawned if keeper.poll() is None}
    for keeper_pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30.0
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        for keeper in spawned:
            keeper.poll()  # reaps our own child
        await asyncio.sleep(_POLL_S)


def _keeper_pid(pid_file: Path) -> int | None:
    """The keeper's pid from the pid file, if that process is still a keeper."""
    try:
        pid = int(pid_file.read_text().split()[2])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if _MODULE.encode() in cmdline else None


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
