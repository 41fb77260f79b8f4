import subprocess
import sys

import lighter_sink


def test_all_names_are_exported_and_importable() -> None:
    public = {name for name in dir(lighter_sink) if not name.startswith("_")}
    public -= {"formats", "cli", "lighter"}  # subpackages and the console entry point, not API names
    assert set(lighter_sink.__all__) == public | {"__version__"}
    for name in lighter_sink.__all__:
        assert getattr(lighter_sink, name) is not None


def test_all_is_sorted() -> None:
    assert list(lighter_sink.__all__) == sorted(lighter_sink.__all__)


def test_the_package_imports_lightning_only_for_the_callback() -> None:
    # Lightning takes seconds to import; a plain loop's Sink and the command line do without it.
    script = (
        "import sys, lighter_sink\n"
        "assert 'lightning' not in sys.modules, 'import lighter_sink imported lightning'\n"
        "assert 'PredictionSink' in dir(lighter_sink)\n"
        "from lighter_sink import PredictionSink\n"
        "assert 'lightning' in sys.modules and PredictionSink.__name__ == 'PredictionSink'\n"
        "try:\n"
        "    lighter_sink.NoSuchName\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchName' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
