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
