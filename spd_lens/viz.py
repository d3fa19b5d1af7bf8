"""Plotly figures; each function returns a `go.Figure` (hover names the token/layer/head and value).

Example:
    >>> from spd_lens import load_model
    >>> from spd_lens.gradient_cache import cache_gradients
    >>> model = load_model("tiny")
    >>> cache = cache_gradients(model, "arithmetic", n=1, layers=[3])
    >>> fig = token_gradient_figure(cache, model.tokenizer, example=0, layer=3, kind="k")
    >>> fig.data[0].type
    'heatmap'
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from spd_lens.errors import SpdLensError


def token_gradient_figure(cache, tokenizer, *, example: int = 0, layer: int, kind: str = "k",
                          head: int | None = None, width: int = 24) -> go.Figure:
    """The example's tokens laid out in rows of `width`, coloured by the gradient norm at `layer`.

    Correctness-defining tokens are outlined in bold; hover shows position, token and value.
    """
    if not 0 <= example < len(cache):
        raise SpdLensError(f"example {example} out of range: the cache holds {len(cache)} examples (0..{len(cache) - 1})")
    norms = cache.token_norms((layer, kind), head)[example]
    length = int(cache.attention_mask[example].sum())
    ids = cache.input_ids[example, :length].tolist()
    correct = cache.correctness_mask[example, :length].tolist()
    tokens = [tokenizer.decode([i]) for i in ids]
    rows = math.ceil(length / width)
    z, text, hover = [], [], []
    for r in range(rows):
        z.append([]), text.append([]), hover.append([])
        for c in range(width):
            p = r * width + c
            if p < length:
                label = tokens[p].replace("\n", "⏎").replace(" ", "·") or "∅"
                z[-1].append(float(norms[p]))
                text[-1].append(f"<b>{label}</b>" if correct[p] else label)
                hover[-1].append(f"pos {p}<br>token {tokens[p]!r}<br>|grad| {float(norms[p]):.3g}"
                                 + ("<br>correctness token" if correct[p] else ""))
            else:
                z[-1].append(None), text[-1].append(""), hover[-1].append("")
    figure = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
                                  colorscale="Viridis", colorbar={"title": "|dL/d" + kind.upper() + "|"}))
    where = "all KV heads" if head is None else f"KV head {head}"
    figure.update_layout(
        title=f"{cache.example_ids[example]}: gradient norm at layer {layer} {kind.upper()} ({where}); bold = correctness tokens",
        yaxis={"autorange": "reversed", "showticklabels": False}, xaxis={"showticklabels": False},
        height=max(250, 28 * rows + 120),
    )
    return figure


def head_energy_figure(cache, kind: str = "k") -> go.Figure:
    """Layer x KV head heatmap of each head's share of the layer's gradient energy."""
    layers = cache.layers
    z = [cache.head_energy((layer, kind)).tolist() for layer in layers]
    hover = [[f"layer {layer}<br>head {h}<br>share {v:.3f}" for h, v in enumerate(row)] for layer, row in zip(layers, z)]
    figure = go.Figure(go.Heatmap(z=z, x=[f"head {h}" for h in range(len(z[0]))], y=layers, hovertext=hover,
                                  hoverinfo="text", colorscale="Viridis", colorbar={"title": "share"}))
    figure.update_layout(title=f"share of {kind.upper()} gradient energy per KV head", yaxis_title="layer")
    return figure


def method_scores_figure(metrics: dict) -> go.Figure:
    """Per-method score bars with 95% confidence intervals (hover: method, score, CI, n)."""
    methods = metrics["methods"]
    names = list(methods)
    scores = [methods[m]["score"] for m in names]
    upper = [methods[m]["ci"][1] - methods[m]["score"] for m in names]
    lower = [methods[m]["score"] - methods[m]["ci"][0] for m in names]
    hover = [f"{m}<br>score {methods[m]['score']:.3f}<br>95% CI [{methods[m]['ci'][0]:.3f}, {methods[m]['ci'][1]:.3f}]"
             f"<br>n {methods[m]['n']}" for m in names]
    figure = go.Figure(go.Bar(x=names, y=scores, error_y={"type": "data", "array": upper, "arrayminus": lower},
                              hovertext=hover, hoverinfo="text", marker_color="#4c78a8"))
    figure.update_layout(title=f"{metrics.get('task')} ({metrics.get('model')}): score per method, 95% bootstrap CI",
                         yaxis_title="score", yaxis_range=[0, max(1e-3, max(methods[m]["ci"][1] for m in names)) * 1.1])
    return figure


def spectrum_figure(subspace, kind: str = "k", head="flat") -> go.Figure:
    """Cumulative gradient energy against rank per layer, with the chosen rank marked."""
    figure = go.Figure()
    for layer in subspace.layers:
        values = subspace.singular_values(layer, kind, head).double() ** 2
        cumulative = (values.cumsum(0) / values.sum()).tolist()
        rank = subspace.rank(layer, kind, head)
        figure.add_scatter(x=list(range(1, len(cumulative) + 1)), y=cumulative, mode="lines", name=f"layer {layer}",
                           hovertemplate=f"layer {layer}<br>rank %{{x}}<br>energy %{{y:.4f}}<extra></extra>")
        figure.add_scatter(x=[rank], y=[cumulative[rank - 1]], mode="markers", marker={"size": 10, "symbol": "x"},
                           name=f"layer {layer} chosen rank {rank}", showlegend=True)
    figure.update_layout(title=f"cumulative {kind.upper()} gradient energy by rank ({'flattened' if head == 'flat' else f'head {head}'})",
                         xaxis_title="rank", yaxis_title="fraction of Σσ²")
    return figure


def write_report(path, figures: list[go.Figure], title: str, notes: str = "") -> None:
    """One self-contained HTML file (plotly.js embedded once: opens offline)."""
    from pathlib import Path

    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>", f"<h1>{title}</h1>",
             f"<pre>{notes}</pre>" if notes else ""]
    for i, figure in enumerate(figures):
        parts.append(figure.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
