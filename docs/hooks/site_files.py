"""mkdocs hook: pages kept outside docs/ enter the site as they are in the repository.

The notebooks (with their committed outputs) and RESULTS.md stay where they live; the site takes
them from there, with the files RESULTS.md links to (figures, the first protocol's page),
so nothing is copied into docs/ to drift.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "RESULTS.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _linked_files(markdown: str) -> set[str]:
    return {target for target in LINK.findall(markdown) if "://" not in target and (ROOT / target).is_file()}


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns notebooks into pages
def on_files(files, config):
    wanted = {f"notebooks/{path.name}" for path in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    results = RESULTS.read_text()
    wanted |= {"RESULTS.md"} | _linked_files(results)
    for linked in [p for p in wanted if p.endswith(".md")]:  # pages RESULTS.md links to bring their figures
        wanted |= {str((Path(linked).parent / t)) for t in LINK.findall((ROOT / linked).read_text())
                   if "://" not in t and (ROOT / Path(linked).parent / t).is_file()}
    for path in sorted(wanted):
        files.append(File(path, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


# nbconvert's page template loads MathJax (an empty src when no URL is set) and, for mermaid
# diagrams, mermaid.js from a CDN. The notebooks use neither, and the site loads nothing from
# outside, so those scripts are taken out of the notebook pages.
_NOTEBOOK_SCRIPTS = [
    re.compile(r'<script src="">\s*</script>'),
    re.compile(r'<script type="text/x-mathjax-config">.*?</script>', re.S),
    re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>', re.S),
]


def on_post_page(output, page, config):
    if page.file.src_uri.endswith(".ipynb"):
        for pattern in _NOTEBOOK_SCRIPTS:
            output = pattern.sub("", output)
    return output
