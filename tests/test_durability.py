"""Durability: on a local filesystem, what ``_SUCCESS`` vouches for is on disk before ``_SUCCESS`` is written.

A power loss cannot be simulated honestly in a test, and the page cache hides whether data reached the disk; what
can be observed is the order of the system calls that make data durable. The run is traced with ``strace``
(skipped where it is missing or not permitted), and the trace must show: every object renamed into place, then a
``syncfs`` of the output's filesystem that returned 0, then the manifest and the marker each written with an
``fsync`` of the file before its rename and of the directory after it. With ``durable=False``, no sync at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

_JOB = textwrap.dedent(
    """
    import sys

    import torch

    from lighter_sink import Sink

    url, fmt, durable = sys.argv[1:4]
    options = {} if durable == "default" else {"durable": durable == "on"}  # durable by default
    with Sink(url, format=fmt, **options) as sink:
        sink.put_batch(range(5), torch.arange(5.0))
    """
)


@dataclass
class _Call:
    name: str
    text: str  # the arguments and the result, as strace wrote them (-y: descriptors with their paths)
    start: int  # trace line where the call began
    end: int  # trace line where it returned

    @property
    def ok(self) -> bool:
        return self.text.rstrip().endswith("= 0")

    def fds(self) -> list[str]:
        """The paths of the call's descriptors (``fd</path>``)."""
        return re.findall(r"<(/[^>]*)>", self.text)

    def names(self) -> list[str]:
        """The call's quoted paths, made absolute with the directory descriptor before each (``renameat``)."""
        names, base = [], ""
        for match in re.finditer(r'<(/[^>]*)>|"([^"]*)"', self.text):
            described, quoted = match.groups()
            if described is not None:
                base = described
            else:
                names.append(os.path.join(base, quoted))  # (an absolute name stays as it is)
        return names


def _calls(log: str) -> list[_Call]:
    """The completed calls of an ``strace -f`` log, in order, ``<unfinished ...>`` halves joined."""
    calls, pending = [], {}
    for index, line in enumerate(log.splitlines()):
        if resumed := re.match(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$", line):
            pid, name, rest = resumed.groups()
            start, head = pending.pop((pid, name))
            calls.append(_Call(name, head + rest, start, index))
        elif call := re.match(r"^(\d+)\s+(\w+)\((.*)$", line):
            pid, name, rest = call.groups()
            if rest.endswith("<unfinished ...>"):
                pending[(pid, name)] = (index, rest.removesuffix("<unfinished ...>"))
            else:
                calls.append(_Call(name, rest, index, index))
    return calls


def _traced_run(tmp_path: Path, out: Path, fmt: str, durable: str) -> list[_Call]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    log = tmp_path / f"{out.name}.strace"
    syscalls = "fsync,fdatasync,syncfs,sync,rename,renameat,renameat2"
    command = [strace, "-f", "-qq", "-y", "-e", f"trace={syscalls}", "-o", str(log)]
    job = [sys.executable, "-c", _JOB, str(out), fmt, durable]
    result = subprocess.run([*command, *job], check=False, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and not log.exists():
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "_SUCCESS").exists()
    return [c for c in _calls(log.read_text()) if any(p.startswith(str(out)) for p in c.fds() + c.names())]


def _renamed_to(calls: list[_Call], path: Path) -> _Call:
    (rename,) = [c for c in calls if c.name.startswith("rename") and c.names()[-1] == str(path)]
    assert rename.ok, rename
    return rename


@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_a_durable_commit_syncs_objects_then_writes_manifest_and_marker_with_fsync(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"durable-{fmt}"
    calls = _traced_run(tmp_path, out, fmt, "default")
    success = _renamed_to(calls, out / "_SUCCESS")
    manifest = _renamed_to(calls, out / "_manifest.jsonl")
    syncs = [c for c in calls if c.name == "syncfs"]
    assert syncs and all(c.ok and c.fds() == [str(out)] for c in syncs), syncs
    if fmt == "npy":
        objects = [_renamed_to(calls, out / f"{i}.npy") for i in range(5)]
        # one syncfs began after the last object was in place and returned before the marker was written
        assert any(s.start > max(o.end for o in objects) and s.end < success.start for s in syncs), calls
        durable_files = [manifest, success]
    else:
        durable_files = [_renamed_to(calls, out / "predictions.csv"), manifest, success]
    assert durable_files[-1] is success
    fsyncs = [c for c in calls if c.name == "fsync" and c.ok]
    for rename in durable_files:
        temp = rename.names()[0]
        assert any(f.fds() == [temp] and f.end < rename.start for f in fsyncs), (rename, fsyncs)
        directory_synced = [f for f in fsyncs if f.fds() == [str(out)] and f.start > rename.end]
        assert directory_synced, (rename, fsyncs)
        if rename is not success:
            assert directory_synced[0].end < success.start


def test_durable_false_syncs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    calls = _traced_run(tmp_path, out, "npy", "off")
    assert _renamed_to(calls, out / "_SUCCESS")
    assert [c for c in calls if c.name in ("fsync", "fdatasync", "syncfs", "sync")] == []
