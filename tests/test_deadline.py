"""Each write attempt is bounded by the store's timeout, on its own: one lazily re-armed timer per task (cheaper
than a timer per object) must still give every write of an uploader its full timeout, end the one that overruns
with a TimeoutError, and leave a cancellation from outside (an abort) a cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pytest

from lighter_sink._store import RetryPolicy, Store
from lighter_sink._types import Buffer


class _SlowStore(Store):
    """A store whose writes take the seconds their body says (``b"0.3"``: 0.3 s), as a slow server would."""

    async def _put_once(self, key: str, buffers: Sequence[Buffer], crc32: int | None) -> None:
        await asyncio.sleep(float(bytes(buffers[0])))

    async def get(self, key: str) -> bytes:
        raise FileNotFoundError(key)

    async def exists(self, key: str) -> bool:
        return False

    async def delete(self, keys: Sequence[str]) -> None:
        pass

    async def list(self, prefix: str = "") -> list[str]:
        return []


def _store(timeout: float) -> _SlowStore:
    return _SlowStore("slow://x", RetryPolicy(attempts=1, timeout=timeout))


def test_every_write_of_a_task_gets_its_full_timeout() -> None:
    async def main() -> float:
        store = _store(0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(4):  # 1.4 s in all, each write 0.35 s of its 0.5 s: none times out
            await store.put("k", [b"0.35"])
        return loop.time() - started

    assert asyncio.run(main()) >= 1.4


def test_a_write_past_its_timeout_fails_with_a_timeout_error_and_the_next_one_is_bounded_again() -> None:
    async def main() -> list[float]:
        store = _store(0.2)
        loop = asyncio.get_running_loop()
        took = []
        for body in (b"0.05", b"5", b"0.05", b"5"):
            started = loop.time()
            with (
                pytest.raises(TimeoutError, match=r"no answer within 0.2 s")
                if body == b"5"
                else contextlib.nullcontext()
            ):
                await store.put("k", [body])
            took.append(loop.time() - started)
        return took

    took = asyncio.run(main())
    assert took[1] < 1.0 and took[3] < 1.0  # each bounded by its own 0.2 s, not by a timer left from before
    assert took[2] < 0.2


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def main() -> None:
        store = _store(10.0)
        task = asyncio.ensure_future(store.put("k", [b"5"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_writes_of_concurrent_tasks_are_bounded_each_on_its_own() -> None:
    async def main() -> list[BaseException | None]:
        store = _store(0.3)

        async def one(body: bytes) -> BaseException | None:
            try:
                await store.put("k", [body])
            except TimeoutError as exc:
                return exc
            return None

        return await asyncio.gather(one(b"0.1"), one(b"5"), one(b"0.2"))

    ok, late, ok_too = asyncio.run(main())
    assert ok is None and ok_too is None and isinstance(late, TimeoutError)


def test_a_shorter_timeout_after_a_longer_one_in_the_same_task_is_kept() -> None:
    async def main() -> float:
        patient, hasty = _store(30.0), _store(0.2)
        loop = asyncio.get_running_loop()
        await patient.put("k", [b"0.01"])  # leaves the task's timer armed 30 s ahead
        started = loop.time()
        with pytest.raises(TimeoutError):
            await hasty.put("k", [b"5"])
        return loop.time() - started

    assert asyncio.run(main()) < 1.0
