import pytest

from lighter_sink import IdentifierError
from lighter_sink._ids import RankCounter, validate_identifier, validate_identifiers


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_counter_interleaves_ranks_like_the_distributed_sampler(world_size: int) -> None:
    counters = [RankCounter(rank, world_size) for rank in range(world_size)]
    batches = [[c.take(5), c.take(2), c.take(0), c.take(3)] for c in counters]
    for rank, ranges in enumerate(batches):
        flat = [i for r in ranges for i in r]
        # rank r gets r, r + W, r + 2W, ...: the dataset indices Lightning's sampler gives it
        assert flat == list(range(rank, rank + 10 * world_size, world_size))
    everything = sorted(i for ranges in batches for r in ranges for i in r)
    assert everything == list(range(10 * world_size))


def test_counter_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        RankCounter(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        RankCounter(0, 0)


@pytest.mark.parametrize(
    ("identifier", "key"),
    [(0, "0"), (17, "17"), ("a", "a"), ("case-3/slice_2", "case-3/slice_2"), ("x.y", "x.y")],
)
def test_valid_identifiers(identifier: object, key: str) -> None:
    assert validate_identifier(identifier) == key


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../escape", r"'\.\.'"),
        ("a/../../b", r"'\.\.'"),
        ("a//b", "empty"),
        ("a\x00b", "control"),
        ("line\nbreak", "control"),
        ("a\\b", "backslash"),
        ("_SUCCESS", "reserved"),
        (-1, ">= 0"),
        (True, "bool"),
        (1.5, "int or a str"),
        (None, "int or a str"),
    ],
)
def test_invalid_identifiers_name_the_offender(identifier: object, message: str) -> None:
    with pytest.raises(IdentifierError, match=message) as info:
        validate_identifier(identifier)
    assert isinstance(info.value, ValueError)


def test_duplicate_in_a_batch_is_refused() -> None:
    with pytest.raises(IdentifierError, match="'7' appears twice"):
        validate_identifiers([5, 7, "7"])
