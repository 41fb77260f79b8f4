"""IdSet: the compact set of ids and keys that resume and remaining() test batches against."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lighter_sink._idset import BUFFER, IdSet


def _check(added: list[str], asked: list[str]) -> None:
    ids = IdSet()
    ids.add(added)
    expected = set(added)
    assert ids.contains(asked).tolist() == [a in expected for a in asked]
    assert len(ids) == len(expected)


def test_a_dense_numeric_range_costs_a_few_bytes_in_all() -> None:
    ids = IdSet()
    total = 3 * BUFFER
    for start in range(0, total, 4096):  # several levels, merged
        ids.add(str(i) for i in range(start, start + 4096))
    assert len(ids) == total
    assert ids.nbytes <= 64
    found = ids.contains_ints(np.arange(total + 5))
    assert found[:total].all() and not found[total:].any()
    assert ids.contains(["0", str(total - 1), str(total), "00", "-1", "7x"]).tolist() == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_sparse_numbers_cost_eight_bytes_each() -> None:
    rng = np.random.default_rng(7)
    values = np.unique(rng.integers(0, 10**12, 200_000))
    ids = IdSet()
    ids.add(str(v) for v in values.tolist())
    assert len(ids) == len(values)
    assert ids.nbytes <= 8 * len(values) + 64
    queries = np.concatenate((values[::3], values[::5] + 1))
    assert ids.contains_ints(queries).tolist() == np.isin(queries, values).tolist()


def test_text_ids_are_digests_of_sixteen_bytes() -> None:
    added = [f"scan-{i:06d}/slice-{i % 7}" for i in range(50_000)] + ["ünïcödé", "7 ", "007", "1²", ""]
    ids = IdSet()
    ids.add(added)
    assert ids.nbytes <= 16 * len(added)
    _check(added, [*added[::97], "scan-050000/slice-0", "07", "7", "1", "ünïcöde", " "])


def test_numbers_and_text_mixed_as_one_set_of_strings() -> None:
    added = ["0", "1", "2", "10", "abc", "007", "18446744073709551616", "999999999999999999"]
    asked = [*added, "3", "7", "00", "18446744073709551615", "1000000000000000000", "ab"]
    _check(added, asked)
    numbers = IdSet()
    numbers.add_ints([5, 6, 10**18, 2**63 - 1])  # (the largest kept as text, as their decimal text would be)
    assert numbers.contains(["5", "6", "7", str(10**18), str(2**63 - 1)]).tolist() == [True, True, False, True, True]
    assert numbers.contains_ints([10**18, 10**18 - 1]).tolist() == [True, False]


def test_a_large_batch_against_many_levels_matches_a_python_set() -> None:
    rng = random.Random(3)
    added = [
        str(rng.randrange(5_000_000)) if rng.random() < 0.7 else f"k{rng.randrange(10**9)}" for _ in range(300_000)
    ]
    ids = IdSet()
    for start in range(0, len(added), 7_000):  # tested between adds: levels sorted as they come
        ids.add(added[start : start + 7_000])
        assert bool(ids.contains([added[start]])[0])
    asked = [str(rng.randrange(5_000_000)) for _ in range(100_000)] + added[::11]
    expected = set(added)
    assert ids.contains(asked).tolist() == [a in expected for a in asked]
    assert added[5] in ids and "never" not in ids


@pytest.mark.parametrize("kind", ["numbers", "text"])
def test_adding_the_same_ids_again_changes_nothing(kind: str) -> None:
    added = [str(i) if kind == "numbers" else f"id-{i}" for i in range(1000)]
    ids = IdSet()
    ids.add(added)
    ids.add(added[::-1])
    assert len(ids) == 1000
    assert ids.contains(added).all()


def test_one_string_at_a_time_answers_as_a_batch() -> None:
    ids = IdSet()
    ids.add([str(i) for i in range(0, 100, 2)] + [str(i) for i in range(1000, 1100)] + ["x", "y"])
    asked = [str(i) for i in range(1200)] + ["x", "z", "", "01"]
    assert [a in ids for a in asked] == ids.contains(asked).tolist()
    assert 7 not in ids  # (only strings are ids)
