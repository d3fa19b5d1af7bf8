"""Every example in the package's docstrings runs and prints what it says (the public API's
documentation cannot drift from the code)."""

import doctest
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

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


# The README's and the docs pages' ```python blocks run as a reader would paste them: each page's
# blocks in order, in one fresh process (a notebook kernel's situation), in an empty directory. A
# block that is not meant to run here (hours of work, another machine, a placeholder) has the line
# `<!-- not run: why -->` just before it.
ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->\s*\n```python\n", re.S)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
RUNNER = r"""
import json, resource, sys, traceback
namespace = {"__name__": "__main__"}
for where, source in json.load(open(sys.argv[1])):
    try:
        exec(compile(source, where, "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"{where} failed")
print("peak_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""
PEAK_GB = 4.0  # every example under 4 GB of peak resident memory (a 16 GB laptop with other things open)


def runnable_blocks(text: str, name: str) -> list[tuple[str, str]]:
    """(where, source) of each ```python block not marked `<!-- not run: why -->`."""
    skipped = {m.end() for m in NOT_RUN.finditer(text)}
    return [(f"{name} line {text[:m.start()].count(chr(10)) + 1}", m.group(1))
            for m in BLOCK.finditer(text) if m.start(1) not in skipped]


def test_not_run_markers_are_read():
    text = "a\n\n```python\nx = 1\n```\n\n<!-- not run: hours -->\n```python\ny = 2\n```\n<!-- not run: -->\n```python\nz = 3\n```\n"
    assert [source for _, source in runnable_blocks(text, "t")] == ["x = 1\n", "z = 3\n"]  # no reason: it runs


def run_blocks(blocks: list[tuple[str, str]], tmp_path: Path) -> None:
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    peak = float(done.stdout.split("peak_gb")[-1])
    assert peak < PEAK_GB, f"the examples peaked at {peak:.2f} GB of resident memory (goal: under {PEAK_GB} GB)"


DOC_PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if runnable_blocks(p.read_text(), p.name))


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_page_examples_run(page, tmp_path):
    run_blocks(runnable_blocks((ROOT / "docs" / page).read_text(), f"docs/{page}"), tmp_path)


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    blocks = runnable_blocks((ROOT / "README.md").read_text(), "README.md")
    assert blocks, "the README's tour has no Python block"
    run_blocks(blocks, tmp_path)
