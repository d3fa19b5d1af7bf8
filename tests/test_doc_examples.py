"""Every example in the package's docstrings runs and prints what it says (the public API's
documentation cannot drift from the code)."""

import doctest
import importlib
import pkgutil

import pytest

import spd_lens

# `spd_lens.cli.__main__` runs the command line when imported.
MODULES = sorted(m.name for m in pkgutil.walk_packages(spd_lens.__path__, "spd_lens.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


def _example_lines(doc: str | None) -> list[str]:
    return [line for line in (doc or "").splitlines() if line.strip().startswith((">>>", "..."))]


def test_every_public_name_has_a_runnable_example():
    """In its own docstring, or in an example line of its module's docstring that uses it."""
    missing = []
    for name in spd_lens.__all__:
        value = getattr(spd_lens, name)
        if not callable(value):
            continue
        module = importlib.import_module(value.__module__)
        if not (_example_lines(value.__doc__) or any(name in line for line in _example_lines(module.__doc__))):
            missing.append(name)
    assert not missing, f"public names without a runnable example: {missing}"
