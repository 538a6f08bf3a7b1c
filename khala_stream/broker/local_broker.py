"""The embedded default broker: a noida-db process speaking the Kafka protocol on 127.0.0.1.

noida-db (pinned to 0.2.3 in pyproject.toml) is an emulator, not Apache Kafka. Nothing outside
this module knows about it: everything else only sees a bootstrap address, so a real Kafka can be
used instead by setting ``KAFKA_BOOTSTRAP_SERVERS``.

Command line (used by ``infra/local/kafka.sh``)::

    python -m khala_stream.broker.local_broker start --data-dir D [--port P] [--timeout S]
    python -m khala_stream.broker.local_broker stop --pid PID [--timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from types import TracebackType
from typing import Self

from khala_stream.errors import UsageError
from khala_stream.processes import die_with_parent, pid_alive

__all__ = [
    "BrokerBusy",
    "LocalBroker",
    "data_dir_in_use",
    "find_broker_binary",
    "start_local_broker",
    "stop_pid",
]

HOST = "127.0.0.1"  # loopback only: the broker has no authentication
_BINARY_NAME = "noida-db"
_POLL_INTERVAL = 0.1
_LOG_TAIL_LINES = 20
_LOCK_NAME = "broker.lock"
"""In the data folder; the running broker holds an exclusive flock on it for its whole life."""


class BrokerBusy(RuntimeError):
    """Another broker already runs on this data folder."""


def _lock_data_dir(data_dir: Path) -> int:
    """An fd holding the data folder's exclusive lock; BrokerBusy if another broker has it."""
    fd = os.open(data_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BrokerBusy(f"another embedded broker already runs on {data_dir}") from None
    return fd


def data_dir_in_use(data_dir: Path) -> bool:
    """Whether a broker runs on `data_dir` (it holds the folder's lock), started by anyone."""
    try:
        fd = os.open(Path(data_dir) / _LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def find_broker_binary() -> Path:
    """Return the noida-db executable shipped inside the installed ``noida_db`` package.

    Raises UsageError (exit 2) when the package is absent: it is installed only where PyPI has
    a wheel for it (see pyproject.toml), and elsewhere the user must name a broker.
    """
    try:
        candidate = Path(str(files("noida_db").joinpath(_BINARY_NAME)))
    except ModuleNotFoundError as exc:
        raise UsageError(
            "no Kafka broker: the embedded one (noida-db) is not installed on this platform; "
            "set KAFKA_BOOTSTRAP_SERVERS to your brokers (host:port)"
        ) from exc
    if not candidate.is_file():
        raise RuntimeError(f"noida-db binary not found at {candidate}")
    mode = candidate.stat().st_mode
    # Wheels unpacked by some installers lose the executable bit; the package's own
    # wrapper does the same chmod before running it.
    if not mode & stat.S_IXUSR:
        candidate.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return candidate


def _free_port() -> int:
    # The kernel hands out an unused ephemeral port; a tiny race with other processes remains,
    # which start_local_broker reports as a failed start (the broker exits on a busy port).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR so that sockets lingering in TIME_WAIT don't count as busy (the broker's
    # own listener sets it too); only a live listener makes bind fail.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _metadata_answered(port: int, timeout: float) -> bool:
    """Send a Kafka Metadata v0 request and return True once a well-formed answer comes back.

    A TCP connect is not enough: the port opens before saved data has been loaded.
    """
    correlation_id = 7
    client_id = b"khala-ready"
    # ApiKey 3 (Metadata), version 0, correlation id, client id; topics array of 0 = all topics.
    request = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", 0)
    try:
        with socket.create_connection((HOST, port), timeout=min(2.0, timeout)) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = sock.recv(4, socket.MSG_WAITALL)
            if len(head) != 4:
                return False
            (size,) = struct.unpack(">i", head)
            body = sock.recv(size, socket.MSG_WAITALL)
            if len(body) < 8:
                return False
            answered_id, broker_count = struct.unpack(">ii", body[:8])
            return bool(answered_id == correlation_id and broker_count >= 1)
    except (OSError, struct.error):
        return False


def _log_tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(log not readable)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _looks_like_broker(pid: int) -> bool:
    # Guards `stop --pid` against a stale pid file whose pid now belongs to something else.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        # Without procfs there is nothing to check against: trust the caller.
        return not Path("/proc/self").exists()
    return _BINARY_NAME.encode() in cmdline


def _wait_pid(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def stop_pid(pid: int, timeout: float = 30.0) -> bool:
    """Stop a broker started by another process (SIGTERM, then SIGKILL after ``timeout``).

    SIGTERM lets noida-db write its snapshot; a clean stop keeps all data.
    Returns False if no such process was running.
    """
    if not pid_alive(pid):
        return False
    if not _looks_like_broker(pid):
        if not pid_alive(pid):
            return False  # exited between the two checks
        raise RuntimeError(f"pid {pid} is not a noida-db broker; refusing to signal it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_pid(pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_pid(pid, 10.0):
        raise RuntimeError(f"broker pid {pid} did not exit after SIGKILL")
    return True


class LocalBroker:
    """A running noida-db broker started by :func:`start_local_broker`.

    Read-only once created. Use it as a context manager, or call :meth:`stop`.
    """

    __slots__ = ("_data_dir", "_log_path", "_port", "_proc")

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, data_dir: Path, log_path: Path
    ) -> None:
        self._proc = proc
        self._port = port
        self._data_dir = data_dir
        self._log_path = log_path

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._log_path

    def is_running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (the broker saves its snapshot); SIGKILL after ``timeout``."""
        if self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, no snapshot: simulates a crash. Data acked in the last ~1 s may be lost."""
        if self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(timeout=10.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"LocalBroker(bootstrap={self.bootstrap!r}, pid={self.pid}, {state})"


def start_local_broker(
    data_dir: Path,
    *,
    port: int | None = None,
    timeout: float = 120.0,
    log_path: Path | None = None,
    with_parent: bool = False,
) -> LocalBroker:
    """Start noida-db (Kafka service only) on 127.0.0.1 and wait until it answers Metadata.

    At most one broker runs on a data folder: noida-db inherits an exclusive lock on a file in
    it, which the kernel releases only when noida-db has exited; BrokerBusy if it is taken.
    `with_parent`: noida-db gets SIGTERM (and saves its snapshot) when this process dies.
    Output goes to ``log_path`` (default: ``broker.log`` next to ``data_dir``), appended so that
    the history of restarts stays readable. Raises RuntimeError naming the log on failure.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_path or data_dir.parent / "broker.log").resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = _free_port()
    elif not _port_is_free(port):
        # Otherwise the readiness probe could be answered by whatever already listens there.
        raise RuntimeError(f"cannot start the local Kafka broker: {HOST}:{port} is already in use")

    binary = find_broker_binary()
    lock = _lock_data_dir(data_dir)
    command = [
        str(binary),
        "start",
        "--only",
        "kafka",
        "--host",
        HOST,
        "--kafka-port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    try:
        with open(log_path, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log_file.write(f"--- {stamp} {' '.join(command)}\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C aimed at the caller must not kill the broker before the
                # caller's cleanup has stopped it cleanly (SIGTERM writes the snapshot).
                start_new_session=True,
                pass_fds=(lock,),  # the lock lives exactly as long as noida-db
                preexec_fn=die_with_parent() if with_parent else None,
            )
    finally:
        os.close(lock)
    broker = LocalBroker(proc, port, data_dir, log_path)

    started = time.monotonic()
    deadline = started + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(
                f"local Kafka broker (noida-db) exited with code {code} during startup; "
                f"see {log_path}:\n{_log_tail(log_path)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            broker.kill()
            raise RuntimeError(
                f"local Kafka broker (noida-db) did not answer a Metadata request on "
                f"{broker.bootstrap} within {timeout:.0f}s; see {log_path}:\n{_log_tail(log_path)}"
            )
        if _metadata_answered(port, remaining) and proc.poll() is None:
            return broker
        time.sleep(_POLL_INTERVAL)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m khala_stream.broker.local_broker",
        description="Start or stop the embedded Kafka-protocol broker (noida-db) on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a broker in the background and wait until ready")
    start.add_argument("--data-dir", type=Path, required=True)
    start.add_argument("--port", type=int, default=None, help="default: a free port")
    start.add_argument("--timeout", type=float, default=120.0, help="readiness timeout (s)")
    stop = sub.add_parser("stop", help="stop a broker by pid (SIGTERM, SIGKILL after timeout)")
    stop.add_argument("--pid", type=int, required=True)
    stop.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            began = time.monotonic()
            broker = start_local_broker(args.data_dir, port=args.port, timeout=args.timeout)
            print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}")
            print(f"KAFKA_PID={broker.pid}")
            print(
                f"kafka ready on {broker.bootstrap} after {time.monotonic() - began:.2f}s "
                f"(log: {broker.log_path})",
                file=sys.stderr,
            )
        else:
            if stop_pid(args.pid, timeout=args.timeout):
                print(f"stopped broker pid {args.pid}", file=sys.stderr)
            else:
                print(f"broker pid {args.pid} was not running", file=sys.stderr)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def running_broker(pid_file: Path) -> str | None:
    """The bootstrap address of an embedded broker another process started, if it answers.

    `pid_file` holds `PID PORT ...` (noida-db's pid first); a stale or foreign one is ignored.
    """
    try:
        pid_text, port_text = pid_file.read_text().split()[:2]
        pid, port = int(pid_text), int(port_text)
    except (OSError, ValueError):
        return None
    if pid_alive(pid) and _looks_like_broker(pid) and _metadata_answered(port, 5.0):
        return f"{HOST}:{port}"
    return None
