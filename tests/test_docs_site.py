"""The documentation site builds strictly (broken links, anchors and API references fail) and
reads offline: no page loads a script, style, font or image from another host."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# src/href of what a browser fetches by itself, url(...) in styles, and import("...") in scripts
FETCHED = [
    re.compile(r'<(?:script|link|img|iframe|source|video|audio|embed)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]+)"', re.I),
    re.compile(r'url\(\s*[\'"]?((?:https?:)?//[^\'")]+)', re.I),
    re.compile(r'\bimport\(\s*[\'"]((?:https?:)?//[^\'"]+)', re.I),
    re.compile(r'@import\s+[\'"]((?:https?:)?//[^\'"]+)', re.I),
]


def external_fetches(html: str) -> list[str]:
    return [url for pattern in FETCHED for url in pattern.findall(html)]


def test_external_fetches_are_found():
    page = ('<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href="//fonts.example/css">'
            '<style>@import "https://a.example/b.css"; .x{background:url(https://c.example/i.png)}</style>'
            '<script type="module">await import("https://d.example/m.mjs")</script>'
            '<a href="https://example.org/">a link is not a fetch</a><img src="img/local.png">')
    assert len(external_fetches(page)) == 5


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_site_builds_strictly_with_every_page(site):
    pages = {str(p.relative_to(site).parent) for p in site.rglob("index.html")}
    for page in ["explore", "ablations", "runs", "own-capability", "gpu", "run-directory", "reliability",
                 "benchmarks", "RESULTS", "api", "architecture", "notebooks/03_api_tour"]:
        assert page in pages, f"{page} missing from the site: {sorted(pages)}"
    notebook = (site / "notebooks" / "01_which_heads_carry_the_capability" / "index.html").read_text()
    assert "<img" in notebook, "the notebooks' committed outputs (figures) are missing from their pages"
    api = (site / "api" / "index.html").read_text()
    assert "extract_subspace" in api and "CapabilitySubspace" in api  # the reference is generated from the code


def test_site_fetches_nothing_from_other_hosts(site):
    found = {}
    for path in [*site.rglob("*.html"), *site.rglob("*.css")]:
        if urls := external_fetches(path.read_text(errors="replace")):
            found[str(path.relative_to(site))] = urls[:3]
    assert not found, f"pages that would fetch from other hosts: {found}"
    # The theme's script loads mermaid.js from a CDN only for a page with a mermaid diagram: there are none.
    assert not any('class="mermaid"' in p.read_text() for p in site.rglob("*.html"))
