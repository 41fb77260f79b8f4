"""Packed outputs (tar and Parquet shards) read back as their users read them: tarfile, webdataset, pyarrow,
pandas, polars, DuckDB and ranged GETs of one record's bytes; never through this library."""

from __future__ import annotations

import gc
import io
import json
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas
import polars
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import webdataset
from torch.utils.data import DataLoader

from benchmarks._servers import boto3_s3
from lighter_sink import ConfigurationError, PredictionError, PredictionSink, Sink, WriteError
from lighter_sink._demo import DemoModel, SyntheticImages
from lighter_sink._verify import verify
from lighter_sink.cli import main
from lighter_sink.formats import ParquetFormat, TarFormat
from tests._shard_reading import WIDTH, manifest, put_all, read_shards, shard_files, tar_members, values
from tests.conftest import S3Server, quiet_trainer

# ---------------------------------------------------------------------------------------------- S3 servers


@dataclass
class Bucket:
    server: str
    name: str
    storage_options: dict[str, Any]
    client: Any

    def keys(self, prefix: str) -> dict[str, int]:
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def get(self, key: str, **kwargs: Any) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.name, Key=key, **kwargs)["Body"].read()
        return body


@pytest.fixture(params=["moto", "rclone"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    if request.param == "moto":
        moto: S3Server = request.getfixturevalue("s3_server")
        return Bucket("moto", request.getfixturevalue("s3_bucket"), moto.storage_options, moto.client())
    server = request.getfixturevalue("rclone")
    name = server.url("").removeprefix("s3://").rstrip("/")  # the bucket the fixture made
    options = server.storage_options
    # rclone answers a ranged GET with the whole object's checksum, which botocore would check the range against
    client = boto3_s3(options, response_checksum_validation="when_required")
    return Bucket("rclone", name, options, client)


# ---------------------------------------------------------------------------------------------- done means


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_20000_predictions_to_s3_are_read_back_whole_and_one_by_one(bucket: Bucket, fmt: str) -> None:
    n = 20_000
    prefix = f"done-{fmt}-{uuid.uuid4().hex[:8]}"
    # tar members take 1 KiB each, parquet rows 64 bytes: several shards either way
    shard_bytes = 2**20 if fmt == "tar" else 2**18
    url = f"s3://{bucket.name}/{prefix}"
    with Sink(url, format=fmt, shard_bytes=shard_bytes, storage_options=bucket.storage_options) as sink:
        put_all(sink, n, batch=500)

    objects = bucket.keys(f"{prefix}/")  # every object under the url, control objects included
    assert len(objects) <= n // 100, sorted(objects)
    shards = sorted(k for k in objects if k.startswith(f"{prefix}/shards/"))
    assert len(shards) >= 4
    stored = read_shards(fmt, (bucket.get(key) for key in shards))
    assert sorted(stored) == list(range(n))
    np.testing.assert_array_equal(np.stack([stored[i] for i in range(n)]), values(range(n)))

    records = {r["id"]: r for r in map(json.loads, bucket.get(f"{prefix}/_manifest.jsonl").decode().splitlines())}
    assert sorted(records) == list(range(n))
    for identifier in (0, 4321, 9999, 15_000, n - 1):
        record = records[identifier]
        start = record["offset"]
        piece = bucket.get(f"{prefix}/{record['path']}", Range=f"bytes={start}-{start + record['nbytes'] - 1}")
        assert len(piece) == record["nbytes"]
        value = np.load(io.BytesIO(piece)) if fmt == "tar" else np.frombuffer(piece, record["dtype"])
        np.testing.assert_array_equal(value, values([identifier])[0])


@pytest.mark.s3
def test_verify_reads_the_shards_by_ranges(bucket: Bucket) -> None:
    # (rclone, like Ceph, answers a ranged GET with the whole object's checksum header: a client that checks the
    # range against it fails on every shard)
    url = f"s3://{bucket.name}/verify-{uuid.uuid4().hex[:8]}"
    with Sink(url, format="tar", shard_bytes=32 * 2**10, storage_options=bucket.storage_options) as sink:
        put_all(sink, 200, batch=20)
    result = verify(url, bucket.storage_options)
    assert (result.ok, result.checked) == (True, 200)


# ---------------------------------------------------------------------------------------------- readers as they are


def test_webdataset_reads_every_sample_of_the_tar_shards(tmp_path: Path) -> None:
    n = 1000
    with Sink(tmp_path, format="tar", shard_bytes=64 * 2**10) as sink:
        put_all(sink, n, batch=64)
    urls = [str(p) for p in shard_files(tmp_path)]
    assert len(urls) >= 5
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # webdataset leaves its shard files to the collector
        for sample in webdataset.WebDataset(urls, shardshuffle=False).decode():
            key = sample["__key__"]
            assert key not in seen
            seen[key] = sample["npy"]
        gc.collect()
    assert sorted(seen) == sorted(map(str, range(n)))
    np.testing.assert_array_equal(np.stack([seen[str(i)] for i in range(n)]), values(range(n)))


def test_pyarrow_pandas_polars_and_duckdb_read_the_parquet_shards(tmp_path: Path) -> None:
    n = 1000
    with Sink(tmp_path, format="parquet", shard_bytes=16 * 2**10) as sink:
        put_all(sink, n, batch=64)
    files = shard_files(tmp_path)
    assert len(files) >= 3
    expected = values(range(n))

    table = ds.dataset(tmp_path / "shards", format="parquet").to_table().sort_by("id")
    assert table.column("id").to_pylist() == list(range(n))
    np.testing.assert_array_equal(table.column("value").combine_chunks().flatten().to_numpy().reshape(n, -1), expected)
    for file in files:  # the schema says what a prediction is
        assert json.loads(pq.read_schema(file).metadata[b"lighter_sink"]) == {"shape": [WIDTH], "dtype": "float32"}

    frame = pandas.read_parquet(tmp_path / "shards").sort_values("id")
    assert frame["id"].tolist() == list(range(n))
    np.testing.assert_array_equal(np.stack(frame["value"].to_list()), expected)

    pattern = str(tmp_path / "shards" / "*.parquet")
    frame = polars.read_parquet(pattern).sort("id")
    assert frame["id"].to_list() == list(range(n))
    np.testing.assert_array_equal(np.stack(frame["value"].to_numpy()), expected)
    one = polars.scan_parquet(pattern).filter(polars.col("id") == 777).collect()
    assert one["value"].to_list() == [expected[777].tolist()]

    [(count, distinct, low, high, first)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT id), min(id), max(id), sum(value[1]) FROM '{pattern}'"
    ).fetchall()
    assert (count, distinct, low, high, first) == (n, n, 0, n - 1, float(expected[:, 0].sum()))


class _Named(SyntheticImages):
    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"image": super().__getitem__(index), "name": f"patient-{index:03d}.nii.gz"}


class _Scores(DemoModel):
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"scores": self(batch["image"]).flatten(1)[:, :4], "name": batch["name"]}


def test_text_ids_give_a_string_id_column(tmp_path: Path) -> None:
    """A user's id_key holding file names: the id column holds them as they are."""
    sink = PredictionSink(tmp_path, format="parquet", value_key="scores", id_key="name", shard_bytes=256)
    model = _Scores()
    quiet_trainer(sink).predict(model, DataLoader(_Named(30, size=8), batch_size=4), return_predictions=False)
    table = pq.read_table(tmp_path / "shards")
    assert table.schema.field("id").type == pa.string()
    names = table.column("id").to_pylist()
    assert sorted(names) == [f"patient-{i:03d}.nii.gz" for i in range(30)]
    with torch.no_grad():
        first = model(_Named(30, size=8)[7]["image"][None]).flatten(1)[0, :4].numpy()
    row = table.column("value").to_pylist()[names.index("patient-007.nii.gz")]
    np.testing.assert_allclose(row, first, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- edge cases


def _ranged(out: Path, record: dict[str, Any]) -> bytes:
    with open(out / record["path"], "rb") as f:
        f.seek(record["offset"])
        return f.read(record["nbytes"])


def test_bfloat16_predictions_become_pt_members_that_torch_loads(tmp_path: Path) -> None:
    batch = torch.randn(5, 3).bfloat16()
    with Sink(tmp_path / "bf16", format="tar") as sink:
        sink.put_batch(range(5), batch)
        sink.put_batch(range(5, 7), torch.ones(2, 3))  # numpy holds these: .npy members beside the .pt ones
    with Sink(tmp_path / "pt", format=TarFormat(member="pt")) as sink:
        sink.put_batch(range(3), torch.ones(3, 2, dtype=torch.float64))
    [shard] = shard_files(tmp_path / "bf16")
    members = {stem: (extension, body) for stem, extension, body in tar_members(shard.read_bytes())}
    assert {stem: extension for stem, (extension, _) in members.items()} == {
        **{str(i): "pt" for i in range(5)},
        "5": "npy",
        "6": "npy",
    }
    for i in range(5):
        loaded = torch.load(io.BytesIO(members[str(i)][1]))
        assert loaded.dtype == torch.bfloat16
        assert torch.equal(loaded, batch[i])
    record = next(r for r in manifest(tmp_path / "bf16") if r["id"] == 3)
    assert torch.equal(torch.load(io.BytesIO(_ranged(tmp_path / "bf16", record))), batch[3])  # one ranged read
    np.testing.assert_array_equal(np.load(io.BytesIO(members["6"][1])), np.ones(3, np.float32))
    [shard] = shard_files(tmp_path / "pt")
    for stem, extension, body in tar_members(shard.read_bytes()):
        assert extension == "pt"
        assert torch.equal(torch.load(io.BytesIO(body)), torch.ones(2, dtype=torch.float64)), stem


def test_parquet_scalars_matrices_and_narrow_integers(tmp_path: Path) -> None:
    with Sink(tmp_path / "scalars", format="parquet") as sink:
        sink.put_batch(range(10), torch.arange(10, dtype=torch.float64) / 4)
    table = pq.read_table(tmp_path / "scalars" / "shards")
    assert table.schema.field("value").type == pa.float64()  # a plain column: no list of one
    assert dict(zip(table.column("id").to_pylist(), table.column("value").to_pylist(), strict=True)) == {
        i: i / 4 for i in range(10)
    }

    matrices = torch.arange(6 * 12, dtype=torch.float32).reshape(6, 3, 4)
    with Sink(tmp_path / "matrices", format="parquet") as sink:
        sink.put_batch(range(6), matrices)
    [file] = shard_files(tmp_path / "matrices")
    meta = json.loads(pq.read_schema(file).metadata[b"lighter_sink"])
    assert meta == {"shape": [3, 4], "dtype": "float32"}
    table = pq.read_table(file)
    assert table.schema.field("value").type == pa.list_(pa.float32(), 12)
    rows = table.column("value").combine_chunks().flatten().to_numpy().reshape(-1, *meta["shape"])
    np.testing.assert_array_equal(rows[table.column("id").to_pylist().index(4)], matrices[4].numpy())
    record = next(r for r in manifest(tmp_path / "matrices") if r["id"] == 4)
    ranged = np.frombuffer(_ranged(tmp_path / "matrices", record), record["dtype"]).reshape(record["shape"])
    np.testing.assert_array_equal(ranged, matrices[4].numpy())

    # several row groups per shard: each one's values are where their records say
    many = torch.arange(300 * 5, dtype=torch.float32).reshape(300, 5)
    with Sink(tmp_path / "groups", format=ParquetFormat(row_group_bytes=1000), shard_bytes=3000) as sink:
        for start in range(0, 300, 30):
            sink.put_batch(range(start, start + 30), many[start : start + 30])
    files = shard_files(tmp_path / "groups")
    assert len(files) >= 3 and all(pq.ParquetFile(f).num_row_groups >= 2 for f in files[:-1])
    for record in manifest(tmp_path / "groups"):
        np.testing.assert_array_equal(np.frombuffer(_ranged(tmp_path / "groups", record), "<f4"), many[record["id"]])

    small = torch.tensor([[-128, -1, 0, 127], [5, 6, 7, 8]], dtype=torch.int8)
    with Sink(tmp_path / "int8", format="parquet") as sink:
        sink.put_batch([0, 1], small)
    table = pq.read_table(tmp_path / "int8" / "shards")
    assert table.schema.field("value").type == pa.list_(pa.int8(), 4)
    for record in manifest(tmp_path / "int8"):
        assert record["dtype"] == "int8"
        # Parquet stores 8-bit integers widened to 32 bits: a ranged read returns them so
        ranged = np.frombuffer(_ranged(tmp_path / "int8", record), "<i4")
        np.testing.assert_array_equal(ranged, small[record["id"]].numpy())


def test_what_parquet_cannot_hold_is_refused_at_put(tmp_path: Path) -> None:
    """On the caller's thread, before anything is queued: the sink keeps working."""
    with Sink(tmp_path, format="parquet") as sink:
        with pytest.raises(PredictionError, match=r"stores numbers, got dtype torch.bool.*\.to\(torch.uint8\)"):
            sink.put_batch(range(2), torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(PredictionError, match=r"at least one value, got shape \(3, 0\)"):
            sink.put_batch(range(2), torch.ones(2, 3, 0))
        sink.put_batch(range(2), torch.ones(2, 3))
    assert [r["id"] for r in manifest(tmp_path)] == [0, 1]


@pytest.mark.parametrize(
    ("shard_bytes", "flush"),
    [(2**20, False), (2**20, True), (64, False)],
    ids=["in-one-shard", "after-a-flush", "after-shard-bytes"],
)
def test_parquet_refuses_predictions_of_mixed_shapes(tmp_path: Path, shard_bytes: int, flush: bool) -> None:
    """Files of one output that disagree on the value column's type cannot be read together: refused, whether the
    first prediction of the new shape goes into the open shard or opens the next one."""
    refused = pytest.raises(WriteError, match=r"one shape and dtype.*\(3,\) float32, got \(4,\) float32")
    with refused, Sink(tmp_path, format="parquet", shard_bytes=shard_bytes) as sink:
        sink.put_batch(range(8), torch.ones(8, 3))  # 96 bytes: more than a shard of 64
        if flush:
            sink.flush()  # (records what was put: the open shard is complete)
        sink.put_batch(range(8, 10), torch.ones(2, 4))
    assert not (tmp_path / "_SUCCESS").exists()


def test_parquet_ids_keep_one_type_across_shards(tmp_path: Path) -> None:
    """An id column of int64 in one file and of strings in the next cannot be read together."""
    refused = pytest.raises(WriteError, match=r"ids of one type.*numbers so far, got text ids such as 'scan-a'")
    with refused, Sink(tmp_path / "numbers-first", format="parquet") as sink:
        sink.put_batch(range(4), torch.ones(4, 3))
        sink.flush()
        sink.put_batch(["scan-a", "scan-b"], torch.ones(2, 3))
    # text first: the numbers that follow are text too
    with Sink(tmp_path / "text-first", format="parquet") as sink:
        sink.put_batch(["scan-a", "scan-b"], torch.ones(2, 3))
        sink.flush()
        sink.put_batch(range(4), torch.ones(4, 3))
    table = ds.dataset(tmp_path / "text-first" / "shards", format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == ["0", "1", "2", "3", "scan-a", "scan-b"]


def test_options_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"shard_bytes applies to formats that pack.*'npy'"):
        Sink(tmp_path, format="npy", shard_bytes=2**20)
    with pytest.raises(ConfigurationError, match=r"format 'tar' names each prediction.*key='\{id:05d\}'"):
        Sink(tmp_path, format="tar", key="{id:05d}")
    with pytest.raises(ConfigurationError, match="shard_bytes must be a positive int"):
        Sink(tmp_path, format="parquet", shard_bytes=0)


@pytest.mark.parametrize(("fmt", "shard_bytes"), [("tar", 20_000), ("parquet", 5_000)])
def test_shards_close_once_they_reach_shard_bytes(tmp_path: Path, fmt: str, shard_bytes: int) -> None:
    batch = 7
    with Sink(tmp_path, format=fmt, shard_bytes=shard_bytes) as sink:
        put_all(sink, 500, batch=batch)
    records = manifest(tmp_path)
    files = shard_files(tmp_path)
    assert len(files) >= 3
    if fmt == "tar":
        member = 1024  # a 512-byte header and a 192-byte .npy padded to 512
        batch_bytes, closing = batch * member, 1024  # (the end-of-archive marker)
        sizes = [f.stat().st_size - closing for f in files]
    else:  # a Parquet shard counts its values (ids and footer come on top)
        batch_bytes = batch * WIDTH * 4
        sizes = [sum(r["nbytes"] for r in records if r["path"] == f"shards/{f.name}") for f in files]
    for size in sizes[:-1]:
        assert shard_bytes <= size < shard_bytes + batch_bytes
    assert 0 < sizes[-1] < shard_bytes + batch_bytes


# ---------------------------------------------------------------------------------------------- verify


def _shard_of(out: Path, identifier: int) -> tuple[dict[str, Any], list[int]]:
    records = manifest(out)
    record = next(r for r in records if r["id"] == identifier)
    return record, [r["id"] for r in records if r["path"] == record["path"]]


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_verify_finds_a_flipped_byte_a_lost_shard_and_a_stray_one(tmp_path: Path, fmt: str) -> None:
    base = tmp_path / "base"
    with Sink(base, format=fmt, shard_bytes=8 * 2**10) as sink:
        put_all(sink, 300, batch=16)
    assert verify(str(base)).ok
    record, siblings = _shard_of(base, 137)
    assert len(siblings) < 300

    flipped = shutil.copytree(base, tmp_path / "flipped")
    with open(flipped / record["path"], "r+b") as f:
        f.seek(record["offset"] + record["nbytes"] - 1)  # the last byte of its values
        last = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([last[0] ^ 0x10]))
    problems = verify(str(flipped)).problems
    assert [(p.kind, p.id, p.path) for p in problems] == [("checksum", "137", record["path"])]

    lost = shutil.copytree(base, tmp_path / "lost")
    (lost / record["path"]).unlink()
    problems = verify(str(lost)).problems
    assert {p.kind for p in problems} == {"missing"}
    assert sorted(int(p.id or -1) for p in problems) == sorted(siblings)

    stray = shutil.copytree(base, tmp_path / "stray")
    copy = f"shards/0123456789abcdef-01234567-r00000-000000.{fmt}"  # as another run would name it
    shutil.copy(stray / record["path"], stray / copy)
    problems = verify(str(stray)).problems
    assert [(p.kind, p.path) for p in problems] == [("unlisted", copy)]


def test_inspect_runs_on_a_shard_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Sink(tmp_path, format="tar", shard_bytes=8 * 2**10) as sink:
        put_all(sink, 50, batch=10)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tar" in out and "50" in out
