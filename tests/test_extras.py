"""A format whose optional package is missing fails when the sink is built, naming the extra to install.

Each test runs a user's script in a fresh interpreter where the package cannot be imported (``sys.modules[name] =
None`` makes ``import name`` raise ``ImportError``, as on a machine without it). Lightning is imported first: here
torchmetrics imports matplotlib, which needs Pillow; a machine without Pillow has no matplotlib either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("package", "builds", "extra"),
    [
        (
            "PIL",
            ["Sink(url, format='png')", "PredictionSink(url, format='png')", "FileWriter(url, 'pred', 'image_2d')"],
            "lighter-sink[image]",
        ),
        (
            "zarr",
            ["Sink(url, format='zarr', num_samples=4)", "PredictionSink(url, format='zarr')"],
            "lighter-sink[zarr]",
        ),
    ],
)
def test_a_missing_extra_fails_at_construction(tmp_path: Path, package: str, builds: list[str], extra: str) -> None:
    url = tmp_path / "preds"
    done = _run(
        f"""
        import sys
        import lightning.pytorch

        for name in [m for m in sys.modules if m.split(".")[0] == {package!r}]:
            del sys.modules[name]
        sys.modules[{package!r}] = None  # not installed
        from lighter_sink import MissingDependencyError, PredictionSink, Sink
        from lighter_sink.lighter import FileWriter

        url = {str(url)!r}
        for build in {builds!r}:
            try:
                eval(build)
            except MissingDependencyError as exc:
                print(build, "refused:", exc)
            else:
                print(build, "built")
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(builds), done.stdout
    for build, line in zip(builds, lines, strict=True):
        assert line.startswith(f"{build} refused:"), line
        assert extra in line
    assert not url.exists()  # nothing was prepared
