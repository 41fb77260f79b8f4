import pytest

from lighter_sink import ConfigurationError, IdentifierError
from lighter_sink._ids import KeyTemplate, RankCounter, is_numeric_id, validate_identifier, validate_identifiers
from lighter_sink._manifest import id_order, sorted_ids


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


@pytest.mark.parametrize(
    ("template", "identifier", "key"),
    [
        ("{id}", 7, "7"),
        ("{id:08d}", 7, "00000007"),
        ("{id:08d}", "7", "00000007"),
        ("run/{id}", "a", "run/a"),
        ("{hash:.2}/{id}", 5, "84/5"),
    ],
)
def test_key_templates_render_and_parse_back(template: str, identifier: object, key: str) -> None:
    keys = KeyTemplate(template)
    assert keys.render(identifier) == key  # type: ignore[arg-type]
    assert keys.parse(key) == str(identifier)


def test_hash_prefixes_spread_keys() -> None:
    keys = KeyTemplate("{hash:.2}/{id}")
    prefixes = {keys.render(i).split("/")[0] for i in range(2000)}
    assert len(prefixes) > 200  # of 256 possible


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{name}", "unknown fields: name"),
        ("static", "must use the field"),
        ("../{id}", "safe key"),
        ("{id", "malformed"),
    ],
)
def test_bad_key_templates_fail_at_construction(template: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        KeyTemplate(template)


def test_a_template_that_cannot_format_an_id_names_it() -> None:
    with pytest.raises(IdentifierError, match="cannot format the id 'abc'"):
        KeyTemplate("{id:08d}").render("abc")


@pytest.mark.parametrize(
    ("identifier", "numeric"),
    [
        ("0", True),
        ("7", True),
        ("10", True),
        ("123456789012345678901234567890", True),
        ("007", False),  # a leading zero: text, or "007" and "7" would be one id
        ("00", False),
        ("1\u00b2", False),  # '1²': str.isdigit() says yes, int() says no
        ("\u0663", False),  # Arabic-Indic three: int() reads it as 3
        ("\uff17", False),  # fullwidth seven
        ("", False),
        ("-1", False),
        ("+1", False),
        (" 1", False),
        ("1_000", False),
        ("1.0", False),
    ],
)
def test_a_numeric_id_is_the_canonical_decimal_text_of_an_int(identifier: str, numeric: bool) -> None:
    assert is_numeric_id(identifier) is numeric
    if numeric:
        assert str(int(identifier)) == identifier


def test_ids_with_unicode_digits_sort_as_text() -> None:
    ids = ["10", "1\u00b2", "7", "007", "a", "\u0663", "0"]
    assert sorted_ids(ids) == ["0", "7", "10", "007", "1\u00b2", "a", "\u0663"]
    assert sorted(ids, key=id_order) == sorted_ids(ids)


@pytest.mark.parametrize(
    ("template", "identifier", "key"),
    [
        ("pred-{id}", "001", "pred-001"),
        ("pred-{id}", "007", "pred-007"),
        ("pred-{id}", "7", "pred-7"),
        ("pred-{id}", 7, "pred-7"),
        ("{hash:.2}/{id}", "001", "55/001"),
        ("{hash:.2}/{id}", "1", "83/1"),
        ("pred-{id}", "\u0663", "pred-\u0663"),
        ("pred-{id}", "1\u00b2", "pred-1\u00b2"),
        ("{id:08d}", 1, "00000001"),
        ("{id:08d}", "1", "00000001"),
        ("{id:x}", 255, "ff"),
        ("{id:#_b}", 5, "0b101"),
        ("{id:,d}", 1234567, "1,234,567"),
    ],
)
def test_a_string_id_keeps_its_text_in_its_key_and_parses_back(template: str, identifier: object, key: str) -> None:
    keys = KeyTemplate(template)
    assert keys.render(identifier) == key  # type: ignore[arg-type]
    assert keys.parse(key) == str(identifier)


@pytest.mark.parametrize("identifier", ["007", "abc", "\u0663", "1\u00b2"])
def test_a_number_template_refuses_a_text_id(identifier: str) -> None:
    with pytest.raises(IdentifierError, match="formats numbers") as info:
        KeyTemplate("{id:08d}").render(identifier)
    assert repr(identifier) in str(info.value)


@pytest.mark.parametrize(
    "template", ["{id}", "pred-{id}", "{id:08d}", "{hash:.2}/{id:05d}", "{id}/{id:x}", "{id:#_b}", "{id:+,d}"]
)
def test_a_template_that_keeps_ids_apart_says_so(template: str) -> None:
    keys = KeyTemplate(template)
    assert keys.injective
    numbers = [keys.render(i) for i in range(5000)]
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize(
    ("template", "first", "second"),
    [
        ("{id:1>3}", 1, 11),  # '111'
        ("{id:0<3}", 1, 100),  # '100'
        ("{id:.2e}", 1000, 1001),  # '1.00e+03'
        ("{id:g}", 1234567, 1234568),  # '1.23457e+06'
        ("{id!s:.1}", "ab", "ac"),  # 'a'
        ("{id:5}", "a", "a    "),  # 'a    '
    ],
)
def test_a_template_that_can_merge_ids_says_so(template: str, first: object, second: object) -> None:
    keys = KeyTemplate(template)
    assert not keys.injective
    assert keys.render(first) == keys.render(second)  # type: ignore[arg-type]
