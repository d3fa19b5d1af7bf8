"""Run the notebooks one at a time and store their outputs, with a PNG copy of every figure.

    python notebooks/execute.py                      # every notebook, full size
    python notebooks/execute.py 04_your_own_capability.ipynb --small
    python notebooks/execute.py --images-only        # only attach PNGs to the stored outputs

Each figure is stored as plotly's JSON (interactive in Jupyter) plus a static PNG, which is what a
repository page shows (it does not run plotly.js). PNGs are drawn by kaleido where it works (it
needs a Chrome), else by matplotlib from the figure's data (`spd_lens.figure_files`: no browser);
`--images-only` attaches them to the stored outputs without running anything. One notebook runs
at a time, each in a fresh kernel (memory stays that of one).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
PLOTLY = "application/vnd.plotly.v1+json"
WIDTH, HEIGHT = 800, 450


def execute(path: Path, small: bool) -> str:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.pop("SPD_LENS_SMALL", None)  # the kernel inherits this process's environment
    if small:
        os.environ["SPD_LENS_SMALL"] = "1"
    started = time.time()
    client = NotebookClient(notebook, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        os.environ.pop("SPD_LENS_SMALL", None)
        if previous is not None:
            os.environ["SPD_LENS_SMALL"] = previous
    nbformat.write(notebook, path)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest kernel so far
    return f"executed in {time.time() - started:.0f} s (peak kernel memory so far {peak:.0f} MB)"


def attach_images(path: Path) -> str:
    import tempfile

    import plotly.io as pio

    from spd_lens.figure_files import write_image

    notebook = nbformat.read(path, as_version=4)
    count, engines = 0, set()
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY not in data:
                continue
            figure = pio.from_json(json.dumps(data[PLOTLY]), skip_invalid=True)
            height = figure.layout.height or HEIGHT
            with tempfile.TemporaryDirectory() as folder:
                image = Path(folder) / "figure.png"
                engines.add(write_image(figure, image, width=WIDTH, height=height).split(" (")[0])
                data["image/png"] = base64.b64encode(image.read_bytes()).decode()
            data.pop("text/html", None)  # a copy of plotly.js: megabytes, and pages do not run it
            count += 1
    nbformat.write(notebook, path)
    return f"{count} figure(s) as PNG by {', '.join(sorted(engines)) or '-'} ({path.stat().st_size / 1024:.0f} KB notebook)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every notebook here)")
    parser.add_argument("--small", action="store_true", help="SPD_LENS_SMALL=1, as the test suite runs them")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--images-only", action="store_true", help="only attach PNGs to stored outputs")
    steps.add_argument("--execute-only", action="store_true", help="only execute, attach no PNGs")
    args = parser.parse_args(argv)
    paths = [Path(p) if Path(p).exists() else HERE / p for p in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    images = not args.execute_only
    for path in paths:
        notes = [] if args.images_only else [execute(path, args.small)]
        if images:
            notes.append(attach_images(path))
        print(f"{path.name}: {'; '.join(notes)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
