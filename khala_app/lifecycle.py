"""How a command stops: SIGTERM, SIGINT or SIGHUP end it and everything it started, exit 128 +
signal. A SIGHUP that was ignored when the command started (`nohup`) stays ignored.

In the event loop a signal cancels the command's coroutine, so that its `finally` blocks stop
what it started (stage children, the embedded broker) before the command exits; outside the
loop it raises Interrupted where the command is. A stage service asks for a stop at its next
batch boundary first (exit 0), and is cancelled only if that takes longer than STOP_GRACE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

__all__ = ["STOP_GRACE_S", "Interrupted", "run_until_signalled", "stop_signals"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

STOP_GRACE_S = 2.5
"""How long a stage service may take to reach its batch boundary once asked to stop."""


def _stop_signals() -> tuple[signal.Signals, ...]:
    """SIGINT and SIGTERM; SIGHUP too (a closed terminal or session), unless it is ignored: who
    started the command under `nohup` asked for it to outlive a hangup."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


class Interrupted(BaseException):
    """A stop signal reached the command (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Inside, outside the event loop, the stop signals raise Interrupted (`finally` runs)."""
    if not _in_main_thread():  # only the main thread may set signal handlers
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in _stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_until_signalled(
    coro: Coroutine[Any, Any, T], *, on_signal: Callable[[], None] | None = None
) -> T:
    """Run `coro` in a new event loop; the first stop signal cancels it → Interrupted.

    With `on_signal`, the first signal calls it instead and the cancel follows only after
    STOP_GRACE_S. Later signals are ignored: the stop under way is bounded already, and a
    second cancel would cut short the cleanup that stops children.
    """
    return asyncio.run(_cancelled_by_signals(coro, on_signal))


async def _cancelled_by_signals(
    coro: Coroutine[Any, Any, T], on_signal: Callable[[], None] | None
) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def handle(signum: int) -> None:
        if received:
            return
        received.append(signum)
        if on_signal is None:
            task.cancel()
        else:
            on_signal()
            loop.call_later(STOP_GRACE_S, cancel_late)

    def cancel_late() -> None:
        if task.done():
            return
        logger.warning(
            "not stopped %gs after %s: cancelling the work in progress (a rerun redoes it)",
            STOP_GRACE_S,
            signal.Signals(received[0]).name,
        )
        task.cancel()

    if not _in_main_thread():
        return await coro
    signals = _stop_signals()
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, handle, sig)
    try:
        return await coro
    except BaseException as exc:
        # Whatever a stop cut short (a cancel, or an error it caused) ends as the signal's code.
        if received and not isinstance(exc, Interrupted):
            raise Interrupted(received[0]) from exc
        raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler)
