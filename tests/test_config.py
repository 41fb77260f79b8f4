import dataclasses
import typing
from pathlib import Path

import pytest

import lighter_sink
from lighter_sink import ConfigurationError, FormatNotFoundError, Sink, SinkConfig, SinkOptions, SinkState
from lighter_sink.lighter import CsvWriter, FileWriter


def test_every_option_is_declared_once_as_a_field_of_the_config() -> None:
    # SinkOptions is the keyword form of SinkConfig: the two cannot drift apart
    fields = {field.name for field in dataclasses.fields(SinkConfig)} - {"format"}
    assert set(SinkOptions.__annotations__) == fields


@pytest.mark.parametrize(
    "entry", [Sink, lighter_sink.PredictionSink, FileWriter, CsvWriter], ids=lambda entry: entry.__name__
)
def test_every_entry_point_takes_the_shared_options_as_keywords(entry: type) -> None:
    hints = typing.get_type_hints(entry.__init__, include_extras=True)
    assert hints["options"] == typing.Unpack[SinkOptions]


def test_an_unknown_option_is_refused_and_the_known_ones_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'concurrancy'.*concurrency"):
        Sink(tmp_path, concurrancy=4)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="unknown option"):
        lighter_sink.PredictionSink(tmp_path, workers=4)  # type: ignore[call-arg]


def test_a_config_is_frozen_checked_and_keeps_credentials_out_of_its_repr() -> None:
    config = SinkConfig.of("npy", {"storage_options": {"secret": "hunter2"}, "concurrency": 3})
    assert config.concurrency == 3 and config.retry.attempts == 5
    assert "hunter2" not in repr(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.concurrency = 4  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match="concurrency"):
        config.replace(concurrency=0)
    with pytest.raises(FormatNotFoundError, match="npy"):
        SinkConfig.of("nope", {})


def test_the_sink_exposes_its_config(tmp_path: Path) -> None:
    sink = Sink(tmp_path, format="pt", timeout=5.0, copy=False)
    assert sink.config.timeout == 5.0 and sink.config.format.name == "pt"
    assert sink.format is sink.config.format and sink.copy is False
    sink.close()
    assert sink.state is SinkState.ABORTED


def test_progress_shows_queue_throughput_and_stall(tmp_path: Path) -> None:
    import torch

    with Sink(tmp_path) as sink:
        assert sink.progress().queue_bytes == 0
        sink.put_batch([0, 1], torch.zeros(2, 4))
        sink.flush()
        progress = sink.progress()
        assert progress.queue_bytes == 0 and progress.mb_per_second >= 0 and progress.stall_seconds >= 0
    assert sink.stats.items == 2
