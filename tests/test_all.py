import lighter_sink


def test_all_names_are_exported_and_importable() -> None:
    public = {name for name in dir(lighter_sink) if not name.startswith("_")}
    public -= {"formats", "cli", "lighter"}  # subpackages and the console entry point, not API names
    assert set(lighter_sink.__all__) == public | {"__version__"}
    for name in lighter_sink.__all__:
        assert getattr(lighter_sink, name) is not None


def test_all_is_sorted() -> None:
    assert list(lighter_sink.__all__) == sorted(lighter_sink.__all__)
