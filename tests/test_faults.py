"""Reliability: storage faults through a real proxy (tests/_proxy.py), interruptions, bad input and secrets.

S3 traffic goes through a fault-injecting HTTP proxy in front of moto's server; results are read back from moto
directly, around the proxy. Runs that must show that the interpreter exits on its own run in a subprocess
(tests/_fault_job.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lighter_sink import DestinationError, IdentifierError, PredictionError, PredictionSink, Sink, WriteError
from lighter_sink._demo import DemoModel, SyntheticImages
from tests._proxy import FaultProxy
from tests.conftest import S3Server, free_port
from tests.conftest import quiet_trainer as _trainer

JOB = Path(__file__).with_name("_fault_job.py")


def _expected(n: int, size: int) -> torch.Tensor:
    data = SyntheticImages(n, size=size)
    with torch.no_grad():
        return DemoModel().eval()(torch.stack([data[i] for i in range(n)]))


def _objects(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix``, read from moto directly (not through the proxy)."""
    client = s3_server.client()
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in s3_server.keys(bucket, prefix)}


class _Job:
    """tests/_fault_job.py as a subprocess whose stdout lines are awaited with a deadline (never a sleep)."""

    def __init__(self, tmp_path: Path, url: str, *args: str) -> None:
        self.stderr_path = tmp_path / "job.stderr"
        self._stderr = self.stderr_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(JOB), url, *args], stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.lines: list[str] = []

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix``; fails at ``timeout`` or when the job ends without it."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {prefix!r} line within {timeout} s; stdout: {self.lines}; stderr: {self.stderr()}")
            if not self._selector.select(timeout=left):
                continue
            chunk = self.process.stdout.read()
            if not chunk:  # end of stdout: the job exited
                pytest.fail(f"the job ended without a {prefix!r} line; stdout: {self.lines}; stderr: {self.stderr()}")
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)  # the job's faulthandler writes every thread's stack
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)  # (it does not exit on SIGUSR1: this only gives it time to write)
            pytest.fail(f"the job did not exit within {timeout} s; stderr: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-12000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._selector.close()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._stderr.close()


# ---------------------------------------------------------------------------------------------- storage faults


@pytest.mark.s3
def test_throttling_and_resets_are_retried_and_every_prediction_lands(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    n, size = 300, 16
    fault_proxy.configure(error_rate=0.10, reset_rate=0.05, methods={"PUT", "POST", "DELETE"})
    # 15% of writes fail: with ten attempts an object is lost with odds near 1e-8, so the test does not flake
    sink = PredictionSink(
        f"s3://{s3_bucket}/faulty", storage_options=fault_proxy.storage_options, retries=10, timeout=20
    )
    loader = DataLoader(SyntheticImages(n, size=size), batch_size=10)
    _trainer(sink).predict(DemoModel(), loader, return_predictions=False)

    stats = fault_proxy.stats
    assert stats.errors > 0 and stats.resets > 0  # the faults really happened
    assert stats.max_requests_per_connection > 1  # over kept-alive connections
    assert sink.sink is not None
    assert sink.sink.stats.retries > 0
    assert sink.sink.stats.failed == 0

    objects = _objects(s3_server, s3_bucket, "faulty/")
    expected = _expected(n, size)
    assert sorted(k for k in objects if k.endswith(".npy")) == sorted(f"faulty/{i}.npy" for i in range(n))
    for i in range(n):
        np.testing.assert_allclose(
            np.load(io.BytesIO(objects[f"faulty/{i}.npy"])), expected[i].numpy(), rtol=1e-5, atol=1e-6
        )
    ids = [json.loads(line)["id"] for line in objects["faulty/_manifest.jsonl"].decode().splitlines()]
    assert ids == list(range(n))  # each id once, in order
    assert json.loads(objects["faulty/_SUCCESS"])["count"] == n
    assert not any(k.startswith("faulty/_parts/") for k in objects)


@pytest.mark.s3
@pytest.mark.slow
def test_a_black_holed_store_fails_within_the_bound_and_the_process_exits(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    url = f"s3://{s3_bucket}/hole"
    fault_proxy.configure(blackhole_after=60)  # setup and some writes get through, then nothing ever answers
    job = _Job(
        tmp_path,
        url,
        *("--storage-options", json.dumps(fault_proxy.storage_options)),
        *("--n", "3000", "--batch-size", "10", "--timeout", "2", "--retries", "2", "--report", str(report)),
    )
    try:
        job.wait_for_line("RAISED", timeout=120)
        # Predict raised; nothing of the sink may keep the interpreter alive afterwards.
        assert job.wait(timeout=30) == 0, job.stderr()
    finally:
        job.close()
    assert fault_proxy.stats.blackholed > 0
    error = json.loads(report.read_text())
    assert error["seconds"] < 60, error  # 2 attempts of 2 s each, plus back-off: far below the 120 s limit
    assert error["chain"][0]["type"] == "WriteError", error
    assert url in error["chain"][0]["message"]
    assert "TimeoutError" in error["chain"][0]["message"]
    assert error["url"] == url
    assert error["ids"], error
    assert all(i in error["chain"][0]["message"] for i in error["ids"][:3])
    assert error["threads"] == [], error  # no worker, loop or pool thread outlives the failed predict
    assert "hole/_SUCCESS" not in _objects(s3_server, s3_bucket, "hole/")


@pytest.mark.s3
def test_retries_is_the_number_of_attempts_and_every_retry_is_counted(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    with Sink(f"s3://{s3_bucket}/x", storage_options=fault_proxy.storage_options, retries=3, timeout=10) as sink:
        sink.flush()  # opening the sink takes the url's lease with PUTs: let it finish first
        fault_proxy.configure(error_rate=1.0)  # only now
        puts_before = fault_proxy.stats.methods.get("PUT", 0)
        sink.put(0, torch.ones(3))
        with pytest.raises(WriteError, match="SlowDown|reduce your request rate"):
            sink.flush()
        fault_proxy.configure(error_rate=0.0)
        puts = fault_proxy.stats.methods.get("PUT", 0) - puts_before
        retries = sink.stats.retries
        sink.abort()
    assert (puts, retries) == (3, 2)  # three attempts in all, two of them retries


class _RawHttp:
    """One client connection speaking HTTP/1.1 by hand, to check what the proxy accepts."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", 0)))
        return status, headers, body

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.s3
def test_the_proxy_speaks_keep_alive_expect_continue_and_chunked(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    http = _RawHttp(fault_proxy.port)
    try:
        http.send(
            f"PUT /{s3_bucket}/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert http.file.readline() == b"HTTP/1.1 100 Continue\r\n"  # before the body is sent
        assert http.file.readline() == b"\r\n"
        http.send(b"hello")
        assert http.response()[0] == 200
        chunked = b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nx-trailer: 1\r\n\r\n"
        http.send(f"PUT /{s3_bucket}/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked)
        assert http.response()[0] == 200
        fault_proxy.configure(error_rate=1.0)
        http.send(f"PUT /{s3_bucket}/c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nno".encode())
        status, headers, body = http.response()
        assert status == 503
        assert headers["content-type"] == "application/xml"
        assert b"<Code>SlowDown</Code>" in body
        fault_proxy.configure(error_rate=0.0, reset_rate=1.0)
        http.send(f"PUT /{s3_bucket}/d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nno".encode())
        with pytest.raises(ConnectionResetError):
            http.file.readline()
    finally:
        http.close()
    stats = fault_proxy.stats
    assert (stats.connections, stats.max_requests_per_connection) == (1, 4)  # one connection carried them all
    assert (stats.continues, stats.chunked, stats.errors, stats.resets) == (1, 1, 1, 1)
    objects = _objects(s3_server, s3_bucket, "")
    assert objects == {"a": b"hello", "b": b"abcdefg"}

    fault_proxy.configure(reset_rate=0.0, blackhole_after=0)
    hole = _RawHttp(fault_proxy.port)
    try:
        hole.sock.settimeout(0.5)
        hole.send(f"GET /{s3_bucket}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with pytest.raises(TimeoutError):
            hole.file.readline()
    finally:
        hole.close()
    assert fault_proxy.stats.blackholed == 1


class _Exploding(DemoModel):
    def __init__(self) -> None:
        super().__init__()
        self.raised: RuntimeError | None = None

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if batch_idx == 6:
            self.raised = RuntimeError("the model blew up")
            raise self.raised
        return super().predict_step(batch, batch_idx, dataloader_idx)


@pytest.mark.s3
def test_a_model_error_on_s3_propagates_unchanged_and_commits_nothing(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="boom/_SUCCESS", Body=b"{}")  # from an older run
    fault_proxy.configure(latency=0.02)  # writes are still in flight when the model fails
    sink = PredictionSink(f"s3://{s3_bucket}/boom", storage_options=fault_proxy.storage_options)
    model = _Exploding()
    with pytest.raises(RuntimeError) as info:
        _trainer(sink).predict(model, DataLoader(SyntheticImages(80, size=8), batch_size=8), return_predictions=False)
    assert info.value is model.raised
    assert info.value.__cause__ is None
    assert sink.sink is not None
    assert sink.sink.state.value == "aborted"
    objects = _objects(s3_server, s3_bucket, "boom/")
    assert "boom/_SUCCESS" not in objects
    assert "boom/_manifest.jsonl" not in objects


@pytest.mark.s3
@pytest.mark.slow
def test_ctrl_c_stops_a_long_predict_promptly_without_committing(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    fault_proxy.configure(latency=0.01)
    url = f"s3://{s3_bucket}/interrupted"
    job = _Job(
        tmp_path,
        url,
        *("--storage-options", json.dumps(fault_proxy.storage_options)),
        *("--n", "1000000", "--batch-size", "10", "--marker-items", "50"),
    )
    try:
        job.wait_for_line("WROTE", timeout=120)
        job.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        returncode = job.wait(timeout=30)
        assert time.monotonic() - interrupted < 30
    finally:
        job.close()
    assert returncode == 1, job.stderr()  # Lightning's exit after a KeyboardInterrupt, not a crash or a kill
    assert "KeyboardInterrupt" in job.stderr()
    assert not any(line.startswith(("DONE", "RAISED")) for line in job.lines)
    objects = _objects(s3_server, s3_bucket, "interrupted/")
    assert sum(key.endswith(".npy") for key in objects) >= 50
    assert "interrupted/_SUCCESS" not in objects


# ---------------------------------------------------------------------------------------------- bad input
# Covered elsewhere and not repeated here: unknown format, non-tensor outputs and a missing value_key
# (test_callback.py); ids and values of different lengths given to Sink.put_batch, '..' ids given to Sink.put, a
# regular file or a path below one as a Sink's url (test_sink.py); malformed key templates (test_ids.py).


class _Outputs(DemoModel):
    """Returns what ``make(batch, batch_idx)`` builds; batches before ``bad_from`` are well-formed."""

    def __init__(self, make: Any, bad_from: int = 1) -> None:
        super().__init__()
        self.make = make
        self.bad_from = bad_from

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> Any:
        values = self(batch)
        ids = [f"case-{batch_idx}-{i}" for i in range(len(batch))]
        if batch_idx < self.bad_from:
            return {"pred": values, "name": ids}
        return self.make(values, ids)


def _traversal(values: torch.Tensor, ids: list[str]) -> dict[str, Any]:
    return {"pred": values, "name": ["../escaped", *ids[1:]]}


BAD_OUTPUTS = [
    pytest.param(
        lambda v, ids: {"pred": v, "other": ids},
        {"id_key": "name"},
        PredictionError,
        r"id_key 'name' is not in the predict_step output; keys: \['other', 'pred'\]",
        id="missing-id-key",
    ),
    pytest.param(
        lambda v, ids: {"pred": v, "name": ids[:-1]},
        {"id_key": "name"},
        PredictionError,
        "id_key 'name' gives 3 ids but value_key holds 4 predictions",
        id="ids-and-values-of-different-lengths",
    ),
    pytest.param(
        lambda v, ids: {"pred": v, "name": torch.arange(len(v)) / 2},
        {"id_key": "name"},
        PredictionError,
        "must hold a 1-d integer tensor or a list, got torch.float32",
        id="float-ids",
    ),
    pytest.param(
        lambda v, ids: {"pred": v, "name": torch.arange(len(v)) * 1j},
        {"id_key": "name"},
        PredictionError,
        "must hold a 1-d integer tensor or a list, got torch.complex64",
        id="complex-ids",
    ),
    pytest.param(
        lambda v, ids: v,
        {"id_key": "name"},
        PredictionError,
        "need predict_step to return a dict, got Tensor",
        id="id-key-without-a-dict",
    ),
    pytest.param(_traversal, {"id_key": "name"}, IdentifierError, r"'\.\./escaped'.*'\.\.'", id="dotdot-id"),
    pytest.param(
        lambda v, ids: {"pred": v, "name": ["/etc/escaped", *ids[1:]]},
        {"id_key": "name"},
        IdentifierError,
        "'/etc/escaped' is an absolute path; ids must be relative",
        id="absolute-id",
    ),
    pytest.param(
        lambda v, ids: {"pred": v, "name": ["a/../../escaped", *ids[1:]]},
        {"id_key": "name"},
        IdentifierError,
        r"'a/\.\./\.\./escaped'",
        id="nested-dotdot-id",
    ),
    pytest.param(
        lambda v, ids: {"pred": v, "name": ["_SUCCESS", *ids[1:]]},
        {"id_key": "name"},
        IdentifierError,
        "'_SUCCESS' starts with '_', which is reserved",
        id="reserved-id",
    ),
]


@pytest.mark.parametrize(("make", "options", "error", "message"), BAD_OUTPUTS)
def test_bad_outputs_are_refused_clearly_and_nothing_is_committed(
    tmp_path: Path, make: Any, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    out = tmp_path / "run" / "preds"
    sink = PredictionSink(out, **options)
    loader = DataLoader(SyntheticImages(16, size=8), batch_size=4)
    with pytest.raises(error, match=message):
        _trainer(sink).predict(_Outputs(make), loader, return_predictions=False)
    assert not (out / "_SUCCESS").exists()
    assert not (out / "_manifest.jsonl").exists()
    # the first, well-formed batch may be stored; nothing lands outside the url, nothing under a bad name
    assert {p.name for p in out.rglob("*") if p.is_file()} <= {f"case-0-{i}.npy" for i in range(4)} | {"_output.json"}
    assert [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents] == []
    assert not Path("/etc/escaped.npy").exists()
    assert sink.sink is not None
    assert sink.sink.state.value == "aborted"


def _below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "sub"


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file"


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        pytest.param(_a_file, "is a regular file; expected a directory", id="regular-file"),
        pytest.param(_below_a_file, "cannot create the directory", id="below-a-regular-file"),
    ],
)
def test_an_unusable_local_destination_fails_before_any_compute(tmp_path: Path, destination: Any, message: str) -> None:
    url = destination(tmp_path)
    computed: list[int] = []

    class Counting(DemoModel):
        def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            computed.append(batch_idx)
            return super().predict_step(batch, batch_idx, dataloader_idx)

    with pytest.raises(DestinationError, match=message) as info:
        _trainer(PredictionSink(url)).predict(
            Counting(), DataLoader(SyntheticImages(8, size=8), batch_size=4), return_predictions=False
        )
    assert str(url) in str(info.value)
    assert computed == []
    assert (tmp_path / "file").read_text() == "not a directory"


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there


def test_an_unreachable_endpoint_fails_within_seconds_and_names_the_url() -> None:
    endpoint = _closed_port_url()
    sink = PredictionSink("s3://bucket/run", storage_options={"endpoint_url": endpoint})  # default retries, timeout
    started = time.monotonic()
    with pytest.raises(DestinationError, match="s3://bucket/run") as info:
        _trainer(sink).predict(DemoModel(), DataLoader(SyntheticImages(8, size=8), batch_size=4))
    assert time.monotonic() - started < 30
    assert endpoint in str(info.value)  # what came: the endpoint that did not answer
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------- secrets

SECRET = "Zq8planted7Hx-secret"


def _planted(endpoint: str) -> dict[str, Any]:
    """storage_options carrying the secret in every place a user may put one."""
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": SECRET,
        "client_kwargs": {"aws_session_token": f"token-{SECRET}"},
        "config_kwargs": {"user_agent_extra": f"ua-{SECRET}", "connect_timeout": 5},
    }


def _texts_of_error(error: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(error))]
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), repr(current.args), repr(vars(current))]
        current = current.__cause__ or current.__context__
    return texts


def _texts_of_sink(callback: PredictionSink) -> list[str]:
    sink = callback.sink
    assert sink is not None
    store = sink._run.engine.store
    assert store is not None
    return [repr(callback), str(callback), repr(sink), repr(store), repr(sink.stats), json.dumps(sink.stats.as_dict())]


@pytest.mark.s3
def test_no_secret_in_logs_reprs_errors_or_stored_objects(
    fault_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lighter_sink")
    texts: list[str] = []
    loader = DataLoader(SyntheticImages(60, size=8), batch_size=6)

    # a run that succeeds through throttling, so that retries are logged
    fault_proxy.configure(error_rate=0.2, methods={"PUT", "POST", "DELETE"})
    ok = PredictionSink(f"s3://{s3_bucket}/ok", storage_options=_planted(fault_proxy.endpoint), retries=10)
    _trainer(ok).predict(DemoModel(), loader, return_predictions=False)
    assert ok.sink is not None
    texts += [*_texts_of_sink(ok), json.dumps(ok.sink.summary)]

    # a run whose every write is refused (its lease first: the url cannot be used)
    fault_proxy.configure(error_rate=1.0, methods={"PUT"})
    refused = PredictionSink(
        f"s3://{s3_bucket}/refused", storage_options=_planted(fault_proxy.endpoint), retries=2, timeout=5
    )
    with pytest.raises(DestinationError) as write_error:
        _trainer(refused).predict(DemoModel(), loader, return_predictions=False)
    texts += _texts_of_error(write_error.value) + _texts_of_sink(refused)

    # a run whose endpoint does not answer at all
    unreachable = PredictionSink(f"s3://{s3_bucket}/unreachable", storage_options=_planted(_closed_port_url()))
    with pytest.raises(DestinationError) as destination_error:
        _trainer(unreachable).predict(DemoModel(), loader, return_predictions=False)
    texts += [*_texts_of_error(destination_error.value), repr(unreachable)]

    records = [r for r in caplog.records if r.name.startswith("lighter_sink")]
    assert any(r.levelno == logging.DEBUG for r in records)  # the retries were logged, and looked at
    # so was the failure (at DEBUG: the raised error is where a user sees it, once)
    assert any(r.getMessage().startswith("writing to ") and " failed: " in r.getMessage() for r in records)
    texts += [caplog.text] + [r.getMessage() + (r.exc_text or "") for r in caplog.records]

    objects = _objects(s3_server, s3_bucket, "")
    assert {"ok/_SUCCESS", "ok/_manifest.jsonl"} <= set(objects)
    texts += [data.decode("latin-1") for data in objects.values()]

    leaks = [text[:300] for text in texts if SECRET in text]
    assert leaks == []
