"""A timeout per awaited call that costs a float, not a timer: each task re-arms one timer only when it fires.

``asyncio.timeout`` arms a timer for each call and cancels it afterwards (``call_at``, a cancelled handle the loop
later sweeps from its heap): on small objects, a fifth of the event loop's time per object here. A task that
bounds one call after another (an uploader storing object after object) keeps one :class:`_TaskTimer` instead:
starting a call stores its deadline; the timer fires at most once per timeout period and, finding the running
call's deadline later than the one it was armed for, re-arms for it. A call past its deadline ends as under
``asyncio.timeout``: its task is cancelled, and the cancellation becomes a :class:`TimeoutError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["bounded"]

T = TypeVar("T")


class _TaskTimer:
    """The one timer of a task's bounded calls (a task makes one call at a time)."""

    __slots__ = ("armed_for", "deadline", "expired", "handle", "loop", "running", "task")

    def __init__(self, task: asyncio.Task[object], loop: asyncio.AbstractEventLoop) -> None:
        self.task = task
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None
        self.armed_for = 0.0  # the deadline the pending handle fires at
        self.deadline = 0.0  # the running call's
        self.running = False
        self.expired = False

    def arm(self, deadline: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed_for = deadline
        self.handle = self.loop.call_at(deadline, self.fire)

    def fire(self) -> None:
        self.handle = None
        if not self.running:
            return  # the call it was armed for ended: the next call arms it again
        if self.deadline > self.armed_for:
            self.arm(self.deadline)  # a later call is running: its own deadline
            return
        self.expired = True
        self.task.cancel()


# Task-local: a task runs in a context of its own (copied at its creation), so each task gets its own timer.
_timer: ContextVar[_TaskTimer | None] = ContextVar("lighter_sink_task_timer", default=None)


async def bounded(call: Callable[[], Awaitable[T]], timeout: float) -> T:
    """``await call()``, or :class:`TimeoutError` (without arguments, as ``asyncio.timeout`` raises it) once
    ``timeout`` seconds passed. Must run inside a task."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("bounded() must run inside a task")
    timer = _timer.get()
    if timer is None or timer.task is not task:
        timer = _TaskTimer(task, asyncio.get_running_loop())
        _timer.set(timer)
    elif timer.running:  # a bounded call inside another one: it gets its own timer
        async with asyncio.timeout(timeout):
            return await call()
    deadline = timer.loop.time() + timeout
    timer.deadline = deadline
    if timer.handle is None or deadline < timer.armed_for:
        timer.arm(deadline)
    timer.running = True
    cancelling = task.cancelling()
    try:
        return await call()
    except asyncio.CancelledError as exc:
        if timer.expired:
            timer.expired = False
            if task.uncancel() <= cancelling:  # no other cancellation was asked for: this one is the timeout's
                raise TimeoutError from exc
        raise
    finally:
        timer.running = False
        if timer.expired:  # the call ended some other way after the timer cancelled its task
            timer.expired = False
            task.uncancel()
