"""A wrapper filesystem for fault injection: an in-memory fsspec filesystem whose writes obey a Plan.

Registered as ``faulty://``. Each sink gets its own instance (``skip_instance_cache``) and its own store, and the
test keeps the Plan object it passed in ``storage_options``: no class-level state leaks between tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


@dataclass
class Plan:
    """What writes do. ``fail`` errors are raised by the first ``fail_first`` writes (all writes if None)."""

    fail: BaseException | None = None
    fail_first: int | None = None
    fail_keys: set[str] = field(default_factory=set)
    fail_when: Callable[[str], bool] | None = None  # only writes of paths it accepts fail
    # Faults (gate, failures, counts) apply to prediction objects only, unless this is set: the sink's own
    # control objects (lease, manifest parts, marker: a path segment starting with "_") pass untouched.
    control: bool = False
    gate: threading.Event | None = None
    started: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    files: dict[str, Any] = field(default_factory=dict)  # what the filesystem stores, by path
    writes: int = 0
    reads: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes asked) of each ranged read
    failures: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_write(self, path: str) -> None:
        if not self.control and any(segment.startswith("_") for segment in path.split("/")):
            return
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self._write(path)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _write(self, path: str) -> None:
        self.started.release()
        if self.gate is not None and not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        with self.lock:
            self.writes += 1
            failing = self.fail is not None and (
                (self.fail_first is None or self.failures < self.fail_first)
                and (not self.fail_keys or any(path.endswith("/" + k) for k in self.fail_keys))
                and (self.fail_when is None or self.fail_when(path))
            )
            if failing:
                self.failures += 1
        if failing:
            assert self.fail is not None
            raise self.fail


class FaultyFileSystem(MemoryFileSystem):
    protocol = "faulty"

    def __init__(self, plan: Plan | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan or Plan()
        # MemoryFileSystem keeps its files in class attributes; give every instance its own.
        self.store: dict[str, Any] = self.plan.files
        self.pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(super()._strip_protocol(path.removeprefix("faulty://")))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if start is not None and end is not None:
            with self.plan.lock:
                self.plan.reads.append((self._strip_protocol(path), end - start))
        return bytes(super().cat_file(path, start=start, end=end, **kwargs))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.plan.on_write(self._strip_protocol(path))
        super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


def options(plan: Plan) -> dict[str, Any]:
    """storage_options that give a sink on ``faulty://`` its own filesystem following ``plan``."""
    return {"plan": plan, "skip_instance_cache": True}


def read(plan: Plan, path: str) -> bytes:
    """What the filesystem holds at ``path`` (protocol-less, e.g. ``/run/0.npy``)."""
    return bytes(plan.files[path].getvalue())
