"""Figures to files, offline: HTML that shares one plotly.js, and PNG/SVG/PDF without a browser.

`save_figure(fig, path)` writes a plotly figure by the path's suffix:

- `.html`: `plotlyjs="shared"` (default) writes `plotly.min.js` once beside the page and links it,
  so many figures in one folder cost one 4.8 MB script, not one each; `"cdn"` links plotly's CDN
  (small, needs a network to view); `"inline"` embeds it (one self-contained file).
- `.png` / `.svg` / `.pdf`: through kaleido when it is installed and works (it needs a Chrome);
  otherwise, or with `engine="matplotlib"`, drawn by matplotlib from the figure's own data. The
  matplotlib drawing covers what spd_lens draws (heatmaps with their colour scales and cell
  text, bars and points with error bars, subplots, reference lines, titles and axis titles); it
  is a faithful static copy, not a pixel match of plotly's rendering.

Example:
    >>> import tempfile, plotly.graph_objects as go
    >>> from pathlib import Path
    >>> fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": "two bars"})
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_figure(fig, folder / "bars.png", engine="matplotlib").read_bytes()[:4]
    b'\\x89PNG'
    >>> _ = save_figure(fig, folder / "bars.html"); sorted(p.name for p in folder.iterdir())
    ['bars.html', 'bars.png', 'plotly.min.js']
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from spd_lens.artifacts import atomic_write
from spd_lens.errors import SpdLensError

PLOTLY_FILE = "plotly.min.js"
PLOTLYJS_MODES = ("shared", "cdn", "inline")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
ENGINES = ("auto", "kaleido", "matplotlib")


def plotly_script(directory: str | Path, plotlyjs: str = "shared") -> str:
    """The `<script>` tag that loads plotly.js for a page in `directory`: `shared` writes
    `directory/plotly.min.js` (once; again only when another plotly version wrote it) and links
    it; `cdn` links plotly's CDN; `inline` embeds the script."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    if plotlyjs not in PLOTLYJS_MODES:
        raise SpdLensError(f"plotlyjs={plotlyjs!r}: use one of {', '.join(PLOTLYJS_MODES)} (shared: one "
                           f"{PLOTLY_FILE} beside the pages; cdn: linked, needs a network; inline: embedded, ~5 MB)")
    if plotlyjs == "cdn":
        return f"<script src='https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js' charset='utf-8'></script>"
    code = get_plotlyjs()
    if plotlyjs == "inline":
        return f"<script type='text/javascript'>{code}</script>"
    path = Path(directory) / PLOTLY_FILE
    if not path.is_file() or path.stat().st_size != len(code.encode()) or path.read_text(encoding="utf-8") != code:
        atomic_write(path, lambda tmp: Path(tmp).write_text(code, encoding="utf-8"))
    return f"<script src='{PLOTLY_FILE}' charset='utf-8'></script>"


def save_figure(fig, path: str | Path, *, plotlyjs: str = "shared", engine: str = "auto",
                width: int | None = None, height: int | None = None, scale: float = 1.0) -> Path:
    """Write `fig` to `path` (`.html`, `.png`, `.svg` or `.pdf`; see the module docstring) and
    return the path. `engine` for images: `auto` (kaleido if it works here, else matplotlib),
    `kaleido` or `matplotlib`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if engine not in ENGINES:
        raise SpdLensError(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        page = ("<html><head><meta charset='utf-8'>" + plotly_script(path.parent, plotlyjs) + "</head><body>"
                + fig.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")
        atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        return path
    if suffix not in IMAGE_SUFFIXES:
        raise SpdLensError(f"{path}: save a figure as .html, {', '.join(IMAGE_SUFFIXES)}")
    write_image(fig, path, engine=engine, width=width, height=height, scale=scale)
    return path


def write_image(fig, path: str | Path, *, engine: str = "auto", width: int | None = None, height: int | None = None,
                scale: float = 1.0) -> str:
    """Write `fig` as an image (format from the suffix); returns how: `"kaleido"`, or
    `"matplotlib"` with the reason kaleido was not used."""
    path = Path(path)
    if engine not in ENGINES:
        raise SpdLensError(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    why = "engine='matplotlib'"
    if engine in ("auto", "kaleido"):
        try:
            import kaleido  # noqa: F401

            atomic_write(path, lambda tmp: fig.write_image(str(tmp), format=path.suffix[1:], width=width,
                                                           height=height, scale=scale))
            return "kaleido"
        except Exception as err:  # not installed, or no Chrome: kaleido reports that in several ways
            if engine == "kaleido":
                raise SpdLensError(f"kaleido could not write {path} ({type(err).__name__}: {str(err)[:160]}); "
                                   "use engine='matplotlib' (no browser needed)") from err
            why = f"kaleido: {type(err).__name__}: {str(err)[:100]}"
    atomic_write(path, lambda tmp: render_matplotlib(fig, tmp, format=path.suffix[1:], width=width, height=height,
                                                     scale=scale))
    return f"matplotlib ({why})"


# ----- the matplotlib drawing of a plotly figure -------------------------------------------------


def _text(value) -> str:
    """Plotly's rich text as plain lines: <br> breaks, tags dropped, entities decoded."""
    if value is None:
        return ""
    value = getattr(value, "text", value)
    if value is None:
        return ""
    value = re.sub(r"<br\s*/?>", "\n", str(value))
    return html.unescape(re.sub(r"<[^>]+>", "", value)).strip()


_NAMED = {"viridis": "viridis", "rdbu": "RdBu", "rdbu_r": "RdBu_r", "blues": "Blues", "reds": "Reds",
          "greys": "Greys", "plasma": "plasma", "cividis": "cividis", "inferno": "inferno", "magma": "magma",
          "ylorrd": "YlOrRd", "rdylgn": "RdYlGn", "piyg": "PiYG", "balance": "coolwarm", "bluered": "bwr"}


def _colormap(scale, reverse: bool):
    from matplotlib.colors import LinearSegmentedColormap, to_rgb
    import matplotlib

    if isinstance(scale, str):
        name = _NAMED.get(scale.lower(), "viridis")
        cmap = matplotlib.colormaps[name]
    elif scale:
        stops = [(float(p), _rgb(c, to_rgb)) for p, c in scale]
        cmap = LinearSegmentedColormap.from_list("plotly", stops)
    else:
        cmap = matplotlib.colormaps["viridis"]
    return cmap.reversed() if reverse else cmap


def _rgb(colour: str, to_rgb):
    match = re.fullmatch(r"rgba?\(([^)]*)\)", str(colour).replace(" ", ""))
    if match:
        parts = [float(x) for x in match.group(1).split(",")[:3]]
        return tuple(p / 255 for p in parts)
    return to_rgb(colour)


def _colour(value, default):
    from matplotlib.colors import to_rgba

    if value is None:
        return default
    try:
        return _rgb(value, to_rgba) if str(value).startswith("rgb") else to_rgba(value)
    except ValueError:
        return default


def _axis_names(trace) -> tuple[str, str]:
    return getattr(trace, "xaxis", None) or "x", getattr(trace, "yaxis", None) or "y"


def _layout_axis(layout, name: str):
    key = name[0] + "axis" + name[1:]  # x2 -> xaxis2
    return layout[key] if key in layout else None


def _domain(axis) -> tuple[float, float]:
    domain = getattr(axis, "domain", None) if axis is not None else None
    return (float(domain[0]), float(domain[1])) if domain else (0.0, 1.0)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def render_matplotlib(fig, path, *, format: str = "png", width: int | None = None, height: int | None = None,
                      scale: float = 1.0) -> None:
    """Draw a plotly figure with matplotlib (see the module docstring); `path` is written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    layout = fig.layout
    width = width or layout.width or 800
    height = height or layout.height or 450
    dpi = 100 * scale
    figure = plt.figure(figsize=(width / 100, height / 100), dpi=dpi)
    try:
        import textwrap

        columns = max(40, int(width / 7.5))  # characters a line of the title holds at this size
        title = "\n".join(textwrap.fill(line, columns) for line in _text(layout.title).splitlines())
        top = 1 - (0.05 + 0.045 * (title.count("\n") + 1) * 450 / height) if title else 0.95
        left, right, bottom = 0.11, 0.97, 0.12
        has_legend = any(getattr(t, "showlegend", None) is not False and getattr(t, "name", None)
                         for t in fig.data if t.type in ("bar", "scatter")) and len(fig.data) > 1
        if has_legend:
            right = 0.78
        pairs = []
        for trace in fig.data:
            if _axis_names(trace) not in pairs:
                pairs.append(_axis_names(trace))
        axes, categories = {}, {}
        for xname, yname in pairs:
            x0, x1 = _domain(_layout_axis(layout, xname))
            y0, y1 = _domain(_layout_axis(layout, yname))
            rect = [left + x0 * (right - left), bottom + y0 * (top - bottom),
                    (x1 - x0) * (right - left) * 0.92, (y1 - y0) * (top - bottom) * 0.92]
            axes[(xname, yname)] = figure.add_axes(rect)
        for (xname, yname), ax in axes.items():
            traces = [t for t in fig.data if _axis_names(t) == (xname, yname)]
            # Categorical x (or y): one position per category, in the order first seen.
            cats_x, cats_y = [], []
            for t in traces:
                if t.type == "heatmap":
                    continue
                for v in (t.x if t.x is not None else []):
                    if not _is_number(v) and v not in cats_x:
                        cats_x.append(v)
                if getattr(t, "orientation", None) == "h" or t.type == "scatter":
                    for v in (t.y if t.y is not None else []):
                        if not _is_number(v) and v not in cats_y:
                            cats_y.append(v)
            categories[(xname, yname)] = (cats_x, cats_y)
            n_bars = sum(1 for t in traces if t.type == "bar")
            bar_index = 0
            for t in traces:
                if t.type == "heatmap":
                    _heatmap(figure, ax, t, np)
                elif t.type == "bar":
                    _bar(ax, t, cats_x, cats_y, bar_index, n_bars if layout.barmode in (None, "group") else 1, np)
                    bar_index += 1
                elif t.type == "scatter":
                    _scatter(ax, t, cats_x, cats_y, np)
            if cats_x:
                ax.set_xticks(range(len(cats_x)))
                crowded = sum(len(_text(c)) for c in cats_x) * 6 > (right - left) * width
                ax.set_xticklabels([_text(c) for c in cats_x], rotation=30 if crowded else 0,
                                   ha="right" if crowded else "center", fontsize=8)
            if cats_y:
                ax.set_yticks(range(len(cats_y)))
                ax.set_yticklabels([_text(c) for c in cats_y], fontsize=8)
            xaxis, yaxis = _layout_axis(layout, xname), _layout_axis(layout, yname)
            if xaxis is not None:
                ax.set_xlabel(_text(xaxis.title), fontsize=9)
                if xaxis.range:
                    ax.set_xlim(*xaxis.range)
                if xaxis.type == "log":
                    ax.set_xscale("log")
            if yaxis is not None:
                ax.set_ylabel(_text(yaxis.title), fontsize=9)
                if yaxis.range and not any(t.type == "heatmap" for t in traces):
                    ax.set_ylim(*yaxis.range)
                if yaxis.type == "log":
                    ax.set_yscale("log")
                if yaxis.autorange == "reversed":
                    ax.invert_yaxis()
                if yaxis.showticklabels is False:
                    ax.set_yticks([])
            if xaxis is not None and xaxis.showticklabels is False:
                ax.set_xticks([])
        _shapes(fig, axes, categories)
        for note in layout.annotations or []:  # subplot titles and notes placed on the page
            if note.xref == "paper" and note.yref == "paper" and note.x is not None and note.y is not None:
                figure.text(left + note.x * (right - left), bottom + note.y * (top - bottom) + 0.01, _text(note.text),
                            ha="center", va="bottom", fontsize=9)
        if title:
            figure.suptitle(title, fontsize=11, y=0.99, va="top")
        if has_legend:
            handles, labels = [], []
            for ax in axes.values():
                h, lab = ax.get_legend_handles_labels()
                handles += h
                labels += lab
            if handles:
                figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.79, top), fontsize=8, frameon=False)
        # Long rotated tick labels and the legend may reach past the page laid out above: the page
        # grows to hold them rather than cut them off (so it can be a little larger than asked).
        figure.savefig(path, format=format, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(figure)


def _heatmap(figure, ax, t, np) -> None:
    from matplotlib.colors import Normalize, TwoSlopeNorm

    z = np.array([[np.nan if v is None else float(v) for v in row] for row in t.z], dtype=float)
    finite = z[np.isfinite(z)]
    lo = t.zmin if t.zmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = t.zmax if t.zmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-9
    if t.zmid is not None and lo < t.zmid < hi:
        norm = TwoSlopeNorm(vcenter=t.zmid, vmin=lo, vmax=hi)
    else:
        norm = Normalize(vmin=lo, vmax=hi)
    cmap = _colormap(t.colorscale, bool(t.reversescale))
    image = ax.imshow(z, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
    xs = list(t.x) if t.x is not None else list(range(z.shape[1]))
    ys = list(t.y) if t.y is not None else list(range(z.shape[0]))
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([_text(x) for x in xs], fontsize=7, rotation=90 if len(xs) > 12 else 0)
    step = max(1, len(ys) // 30)
    ax.set_yticks(range(0, len(ys), step))
    ax.set_yticklabels([_text(y) for y in ys[::step]], fontsize=7)
    # plotly draws y upwards from the first row unless the axis is reversed: match it.
    ax.invert_yaxis()
    if t.text is not None and z.size <= 600:
        for i, row in enumerate(t.text):
            for j, label in enumerate(row):
                if label not in (None, ""):
                    ax.text(j, i, _text(label), ha="center", va="center", fontsize=7)
    if t.showscale is not False:
        bar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        colorbar = t.colorbar
        if colorbar is not None and colorbar.title is not None:
            bar.set_label(_text(colorbar.title), fontsize=8)
        if colorbar is not None and colorbar.tickvals is not None and colorbar.ticktext is not None:
            bar.set_ticks(list(colorbar.tickvals))
            bar.set_ticklabels([_text(x) for x in colorbar.ticktext])


def _positions(values, categories) -> list[float]:
    return [categories.index(v) if not _is_number(v) and v in categories else (float(v) if _is_number(v) else math.nan)
            for v in values]


def _errors(error, values, np):
    if error is None or error.array is None or error.visible is False:
        return None
    upper = [0.0 if v is None else float(v) for v in error.array]
    lower = [0.0 if v is None else float(v) for v in (error.arrayminus if error.arrayminus is not None else error.array)]
    return np.array([lower, upper])


def _marker_colours(t, n, default):
    colour = t.marker.color if t.marker is not None else None
    if colour is None or isinstance(colour, str):
        return [_colour(colour, default)] * n
    return [_colour(c, default) for c in colour]


def _bar(ax, t, cats_x, cats_y, index: int, group: int, np) -> None:
    horizontal = t.orientation == "h"
    along = list(t.y if horizontal else t.x)
    values = [math.nan if v is None else float(v) for v in (t.x if horizontal else t.y)]
    positions = np.array(_positions(along, cats_y if horizontal else cats_x), dtype=float)
    width = 0.8 / max(group, 1)
    positions = positions - 0.4 + width * (index + 0.5) if group > 1 else positions
    colours = _marker_colours(t, len(values), f"C{index}")
    label = _text(t.name) if t.showlegend is not False else None
    errors = _errors(t.error_x if horizontal else t.error_y, values, np)
    if horizontal:
        ax.barh(positions, values, height=width, color=colours, label=label, xerr=errors, capsize=2)
    else:
        ax.bar(positions, values, width=width, color=colours, label=label, yerr=errors, capsize=2)


def _scatter(ax, t, cats_x, cats_y, np) -> None:
    xs = np.array(_positions(list(t.x), cats_x), dtype=float)
    ys = np.array(_positions(list(t.y), cats_y), dtype=float)
    mode = t.mode or "lines+markers"
    colours = _marker_colours(t, len(xs), "C0")
    line = t.line.color if t.line is not None and t.line.color else None
    label = _text(t.name) if t.showlegend is not False else None
    x_err, y_err = _errors(t.error_x, xs, np), _errors(t.error_y, ys, np)
    if x_err is not None or y_err is not None:
        ax.errorbar(xs, ys, xerr=x_err, yerr=y_err, fmt="none", ecolor="#444", elinewidth=1, capsize=2)
    if "lines" in mode:
        ax.plot(xs, ys, color=_colour(line, colours[0]), label=label if "markers" not in mode else None, linewidth=1.5)
    if "markers" in mode:
        size = t.marker.size if t.marker is not None and isinstance(t.marker.size, (int, float)) else 6
        symbol = {"diamond": "D", "x": "x", "square": "s", "triangle-up": "^"}.get(
            t.marker.symbol if t.marker is not None and isinstance(t.marker.symbol, str) else "", "o")
        ax.scatter(xs, ys, c=colours, s=size ** 2, marker=symbol, label=label, zorder=3)


def _shapes(fig, axes: dict, categories: dict) -> None:
    """Reference lines (`add_hline` / `add_vline`) on the axes they name."""
    from matplotlib.patches import Rectangle

    for shape in fig.layout.shapes or []:
        if shape.type not in ("line", "rect"):
            continue
        xref, yref = (shape.xref or "x").split(" ")[0], (shape.yref or "y").split(" ")[0]
        xref, yref = ("x" if xref == "paper" else xref), ("y" if yref == "paper" else yref)
        ax = axes.get((xref, yref)) or next((a for (x, y), a in axes.items() if x == xref or y == yref), None)
        if ax is None:
            continue
        style = {"color": _colour(shape.line.color, "black") if shape.line else "black",
                 "linestyle": "--" if shape.line is not None and shape.line.dash in ("dot", "dash") else "-",
                 "linewidth": 1}
        if shape.type == "rect":
            ax.add_patch(Rectangle((float(shape.x0), float(shape.y0)), float(shape.x1) - float(shape.x0),
                                   float(shape.y1) - float(shape.y0), fill=False, edgecolor=style["color"],
                                   linewidth=(shape.line.width or 1) * 0.6 if shape.line else 1))
        elif "domain" in (shape.xref or "") and shape.y0 == shape.y1:
            ax.axhline(float(shape.y0), **style)
        elif "domain" in (shape.yref or "") and shape.x0 == shape.x1:
            ax.axvline(float(shape.x0), **style)
