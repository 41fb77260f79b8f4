"""Who owns an output: the lease, and the generation its records belong to.

One run owns an output at a time. At open, rank 0 creates ``_lease.json`` atomically (``O_EXCL``-like locally, a
conditional PUT on S3 and GCS) and renews it while the run lives; another run on the same output is refused
while the lease is fresh. A crashed run's lease runs out after :data:`LEASE_SECONDS` (at once when it ran on this
host and its process is gone); a run that ended, committed or aborted, gives it up.

An output's records belong to a *generation*: a run with ``mode="overwrite"`` starts a new one (and removes what
the earlier generation stored before it writes anything), a resumed run continues the generation it resumes.
Manifest parts live under ``_parts/{generation}/{run}/``, so a commit merges only its own generation's parts and
no run sweeps another's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

from lighter_sink._errors import CommitError, DestinationError
from lighter_sink._layout import ControlKeys
from lighter_sink._store import Store

__all__ = [
    "LEASE_SECONDS",
    "RENEW_SECONDS",
    "Lease",
    "acquire_lease",
    "check_lease",
    "current_generation",
    "read_lease",
    "renew_lease",
    "stored_generation",
]

logger = logging.getLogger(__name__)

#: A lease not renewed for this long belongs to a run that died: another run may take the output over.
LEASE_SECONDS = 60.0
#: How often the holder renews it: several renewals may fail in a row before it runs out.
RENEW_SECONDS = LEASE_SECONDS / 6

# starting: taken, nothing done yet; clearing: removing the earlier output; running: writing
LeaseState = Literal["starting", "clearing", "running"]


_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Lease:
    """What ``_lease.json`` says: which run owns the output, since when, and how far it got."""

    run: str
    generation: str
    host: str
    pid: int
    renewed_at: float
    state: LeaseState = "starting"
    released: bool = False  # given up by a run that ended before it could finish (kept: it says how far it got)

    @classmethod
    def mine(cls, run: str, generation: str = "") -> Lease:
        return cls(run, generation or run, _HOST, os.getpid(), time.time())

    def to_bytes(self) -> bytes:
        data = {
            "run": self.run,
            "generation": self.generation,
            "host": self.host,
            "pid": self.pid,
            "renewed_at": self.renewed_at,
            "state": self.state,
            "released": self.released,
        }
        return json.dumps(data, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        """Parse a lease; raises ``ValueError`` for anything that is not one."""
        try:
            raw: Any = json.loads(data)
            return cls(
                run=str(raw["run"]),
                generation=str(raw["generation"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                renewed_at=float(raw["renewed_at"]),
                state=raw.get("state", "running"),
                released=bool(raw.get("released", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a lease: {exc!r}") from None

    def renewed(self, **changes: Any) -> Lease:
        return replace(self, renewed_at=time.time(), **changes)

    def age(self) -> float:
        return time.time() - self.renewed_at

    def live(self) -> bool:
        """Whether the run holding it may still be writing."""
        if self.released or self.age() > LEASE_SECONDS:
            return False
        if self.host == _HOST and self.pid != os.getpid():
            # A process of this host that is gone renews nothing any more: no need to wait for the expiry.
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # alive, another user's
                return True
        return True

    def describe(self) -> str:
        return f"run {self.run} (host {self.host}, pid {self.pid}), which renewed its lease {self.age():.0f} s ago"


async def read_lease(store: Store, keys: ControlKeys) -> Lease | None:
    """The output's lease, or ``None`` when there is none (or it cannot be parsed: a lease is never torn)."""
    try:
        data = await store.get(keys.lease)
    except FileNotFoundError:
        return None
    try:
        return Lease.from_bytes(data)
    except ValueError:
        logger.warning("%s/%s is not a lease; it is replaced", store.url, keys.lease)
        return None


async def current_generation(store: Store, keys: ControlKeys) -> str | None:
    """The generation an output's records belong to: its lease's, else :func:`stored_generation`'s."""
    lease = await read_lease(store, keys)
    return lease.generation if lease is not None else await stored_generation(store, keys)


async def stored_generation(store: Store, keys: ControlKeys) -> str | None:
    """The generation of an output no run holds: its marker's, else the one generation whose parts are stored
    (an overwrite removes every other's); ``None`` when nothing says."""
    try:
        summary = json.loads(await store.get(keys.success))
    except (FileNotFoundError, ValueError):
        summary = None
    generation = summary.get("generation") if isinstance(summary, dict) else None
    if isinstance(generation, str) and generation:
        return generation
    stored = {key[len(keys.parts) + 1 :].split("/", 1)[0] for key in await store.list(keys.parts)}
    return stored.pop() if len(stored) == 1 else None


async def acquire_lease(store: Store, keys: ControlKeys, run: str) -> tuple[Lease, Lease | None]:
    """Take the output for ``run``; return the new lease and the one it replaced (a dead or finished run's).

    Raises:
        DestinationError: another run holds a live lease (the message names it and when it last renewed).
    """
    mine = Lease.mine(run)
    previous: Lease | None = None
    for _ in range(5):
        if await store.create(keys.lease, mine.to_bytes()):
            # Read it back: on a store that ignores conditional writes, the last of two racing writers wins here.
            held = await read_lease(store, keys)
            if held is None or held.run != run:
                raise DestinationError(
                    f"{store.url} was taken by another run at the same moment"
                    + (f": {held.describe()}" if held is not None else "")
                )
            return mine, previous
        existing = await read_lease(store, keys)
        if existing is not None and existing.run == run:  # (an earlier attempt of this very call got through)
            return mine, previous
        if existing is not None and existing.live():
            raise DestinationError(
                f"{store.url} is being written by another run: {existing.describe()}. A lease runs out "
                f"{LEASE_SECONDS:.0f} s after its last renewal (at once when its process on this host is gone); "
                "wait for that run to finish, or write to another url"
            )
        if existing is not None:
            previous = existing
        await store.delete([keys.lease])
    raise DestinationError(f"{store.url}: could not take the lease; other runs keep taking it")


async def renew_lease(store: Store, keys: ControlKeys, lease: Lease) -> Lease:
    """Write ``lease`` again with a fresh time, once it was checked to be still ours.

    Raises:
        CommitError: another run took the output over.
    """
    await check_lease(store, keys, lease)
    fresh = lease.renewed()
    await store.put(keys.lease, [fresh.to_bytes()])
    return fresh


async def check_lease(store: Store, keys: ControlKeys, lease: Lease) -> None:
    """Raise :class:`CommitError` unless ``lease`` is still the output's lease."""
    held = await read_lease(store, keys)
    if held is None or held.run != lease.run:
        who = held.describe() if held is not None else "nobody (the lease is gone)"
        raise CommitError(f"{store.url} is no longer owned by this run ({lease.run}): it is held by {who}")
