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
from collections import Counter

import plotly.graph_objects as go

from spd_lens.errors import SpdLensError


def token_gradient_figure(cache, tokenizer, *, example: int = 0, layer: int, kind: str = "k",
                          head: int | None = None, width: int = 24) -> go.Figure:
    """The example's tokens laid out in rows of `width`, coloured by the gradient norm at `layer`.

    A token is predicted from the position before it, so the loss on a correctness token is taken
    at the previous position, and a position's K/V can only change predictions made at or after
    it. The figure therefore marks both: correctness tokens are outlined (the last one, and every
    position after it, always shows zero gradient: no prediction the loss is taken on comes after
    it), and the positions that predict them are in bold (where the loss is taken). Hover shows
    position, token, value and role.
    """
    if not 0 <= example < len(cache):
        raise SpdLensError(f"example {example} out of range: the cache holds {len(cache)} examples (0..{len(cache) - 1})")
    norms = cache.token_norms((layer, kind), head)[example]
    length = int(cache.attention_mask[example].sum())
    ids = cache.input_ids[example, :length].tolist()
    correct = cache.correctness_mask[example, :length].tolist()
    predicting = correct[1:] + [False]  # position p predicts token p + 1
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
                text[-1].append(f"<b>{label}</b>" if predicting[p] else label)
                hover[-1].append(f"pos {p}<br>token {tokens[p]!r}<br>|grad| {float(norms[p]):.3g}"
                                 + (f"<br>correctness token (predicted at pos {p - 1})" if correct[p] else "")
                                 + (f"<br>predicts correctness token at pos {p + 1}: loss taken here" if predicting[p]
                                    else ""))
            else:
                z[-1].append(None), text[-1].append(""), hover[-1].append("")
    figure = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", textfont={"size": 10}, hovertext=hover,
                                  hoverinfo="text", colorscale="Viridis",
                                  colorbar={"title": "|dL/d" + kind.upper() + "|"}))
    for p in (p for p in range(length) if correct[p]):
        r, c = divmod(p, width)
        figure.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                         line={"color": "#e45756", "width": 3})
    where = "all KV heads" if head is None else f"KV head {head}"
    figure.update_layout(
        title={"text": f"{cache.example_ids[example]}: gradient norm at layer {layer} {kind.upper()} ({where})<br>"
                       "<sup>outlined = correctness tokens; bold = the positions that predict them<br>(a token is "
                       "predicted from the position before it, so the last correctness token gets no gradient)</sup>"},
        yaxis={"autorange": "reversed", "showticklabels": False}, xaxis={"showticklabels": False},
        height=max(280, 28 * rows + 170), margin={"t": 110},
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


def _run_title(metrics: dict) -> str:
    task, source = metrics.get("task"), metrics.get("subspace_task")
    return f"{task}, subspace from {source}" if source and source != task else str(task)


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
                              hovertext=hover, hoverinfo="text", marker_color="#4c78a8", name="mean over seeds"))
    # Each seed's own score: the spread between seeds is often wider than the pooled interval.
    seeded = [(m, seed, r["score"]) for m in names for seed, r in methods[m].get("seeds", {}).items()]
    if seeded:
        figure.add_scatter(x=[m for m, _, _ in seeded], y=[v for _, _, v in seeded], mode="markers", name="one seed",
                           marker={"color": "#e45756", "size": 9, "symbol": "diamond"},
                           hovertext=[f"{m} seed {seed}: {v:.3f}" for m, seed, v in seeded], hoverinfo="text")
    top = max([methods[m]["ci"][1] for m in names] + [v for _, _, v in seeded])
    figure.update_layout(title=f"{_run_title(metrics)} ({metrics.get('model')}): score per method<br><sup>95% CI over seeds, then questions</sup>",
                         yaxis_title="score", yaxis_range=[0, max(1e-3, top) * 1.1], height=420)
    return figure


def comparison_figure(metrics: dict) -> go.Figure:
    """Paired differences between methods (e.g. `spd - base`) as dots with their 95% intervals
    against a line at zero: green or red where the interval lies above or below zero, grey where
    it includes zero (a difference the run cannot resolve). Hover adds the shared questions."""
    comparisons = metrics["comparisons"]
    names = list(comparisons)[::-1]  # the first comparison on top
    values = [comparisons[k]["difference"] for k in names]
    lows = [comparisons[k]["ci"][0] for k in names]
    highs = [comparisons[k]["ci"][1] for k in names]
    colours = ["#2b8a3e" if lo > 1e-9 else "#c92a2a" if hi < -1e-9 else "#6c757d" for lo, hi in zip(lows, highs)]
    figure = go.Figure(go.Scatter(
        x=values, y=names, mode="markers", marker={"color": colours, "size": 11, "symbol": "diamond"},
        error_x={"type": "data", "array": [hi - v for hi, v in zip(highs, values)],
                 "arrayminus": [v - lo for lo, v in zip(lows, values)], "color": "#444", "thickness": 1.5},
        hovertext=[f"{k}: {v:+.3f} [{lo:+.3f}, {hi:+.3f}], {comparisons[k]['n']} shared questions"
                   for k, v, lo, hi in zip(names, values, lows, highs)],
        hoverinfo="text", showlegend=False))
    figure.add_vline(x=0, line_color="black", line_width=1)
    reach = max([abs(x) for x in lows + highs] + [1e-3]) * 1.1
    figure.update_layout(title=f"{_run_title(metrics)}: paired differences<br><sup>95% CI over seeds, then the shared "
                               "questions; grey: includes zero (not resolved)</sup>",
                         xaxis_title="score difference", xaxis_range=[-reach, reach],
                         height=min(900, 170 + 34 * len(names)), margin={"l": 160, "t": 80})
    return figure


def training_data_figure(metrics: dict) -> go.Figure:
    """Quality of each method's self-generated training data: the share its task's scorer marks
    correct and the share cut off at the token budget, mean over seeds (markers: each seed).
    Measured, never used to filter: SPD's mechanism predicts more correct samples under the
    gradient projection than plain (psr) or random-subspace sampling."""
    methods = {name: m["training_data"] for name, m in metrics["methods"].items() if m.get("training_data")}
    if not methods:
        raise SpdLensError(f"no method of run {metrics.get('run')!r} has training-data quality (only methods "
                           "that self-generate have it)")
    names = list(methods)
    figure = go.Figure()
    for key, label, colour in (("correct", "correct", "#54a24b"), ("cut_off", "cut off at the token budget", "#e45756")):
        figure.add_bar(x=names, y=[methods[m][key] for m in names], name=label, marker_color=colour,
                       hovertext=[f"{m}: {label} {methods[m][key]:.3f} of {methods[m]['n']} completions" for m in names],
                       hoverinfo="text")
    seeded = [(m, seed, q["correct"]) for m in names for seed, q in methods[m].get("seeds", {}).items()]
    if len(seeded) > len(names):
        figure.add_scatter(x=[m for m, _, _ in seeded], y=[v for _, _, v in seeded], mode="markers",
                           name="correct, one seed", marker={"color": "black", "symbol": "diamond", "size": 8},
                           hovertext=[f"{m} seed {seed}: {v:.3f}" for m, seed, v in seeded], hoverinfo="text")
    figure.update_layout(barmode="group", title=f"{_run_title(metrics)}: quality of the self-generated training data",
                         yaxis_title="share of completions", yaxis_range=[0, 1], height=420)
    return figure


def outcome_figure(metrics: dict, key: str = "outcomes", *, top: int = 6) -> go.Figure:
    """Stacked shares of each kind of result per method: `outcomes` (code: passed, timeout, or
    the exception raised) or `answers` (multiple choice: the letter chosen). Kinds beyond the
    `top` most frequent are pooled as "other"."""
    methods = {name: m[key] for name, m in metrics["methods"].items() if m.get(key)}
    if not methods:
        raise SpdLensError(f"no method of run {metrics.get('run')!r} has {key!r} counts "
                           "(outcomes: code tasks; answers: multiple-choice tasks)")
    totals = sum((Counter(counts) for counts in methods.values()), Counter())
    ranked = sorted(totals, key=lambda kind: (kind != "passed", -totals[kind], kind))
    shown, pooled = ranked[:top], set(ranked[top:])
    sizes = {name: sum(counts.values()) for name, counts in methods.items()}
    figure = go.Figure()
    for kind in shown + (["other"] if pooled else []):
        counted = {name: sum(v for k, v in counts.items() if k in pooled) if kind == "other" else counts.get(kind, 0)
                   for name, counts in methods.items()}
        figure.add_bar(x=list(methods), y=[counted[m] / sizes[m] for m in methods], name=kind, hoverinfo="text",
                       hovertext=[f"{m}<br>{kind}: {counted[m]} of {sizes[m]}" for m in methods])
    what = "kind of result (passed, or the exception raised)" if key == "outcomes" else "answer chosen"
    figure.update_layout(barmode="stack", title=f"{_run_title(metrics)}: share of each {what}",
                         yaxis_title="share of completions (seeds pooled)", yaxis_range=[0, 1], height=420)
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
                         xaxis_title="rank", yaxis_title="fraction of Σσ²", yaxis_range=[0, 1.02], height=420)
    return figure


def export_images(figures: list[go.Figure], directory, stem: str, *, suffixes: tuple[str, ...] = ("png", "svg")) -> str:
    """PNG and SVG of each figure, `DIRECTORY/STEM-1.png`, ...: through kaleido where it works,
    else drawn by matplotlib (no browser needed; see `spd_lens.figure_files`).

    Returns a line saying what was written, and how.
    """
    from pathlib import Path

    from spd_lens.figure_files import write_image

    directory = Path(directory)
    written, engines = [], set()
    for i, figure in enumerate(figures):
        for suffix in suffixes:
            path = directory / f"{stem}-{i + 1}.{suffix}"
            try:
                engines.add(write_image(figure, path))
            except Exception as err:  # a figure the static drawing cannot render: the HTML still has it
                return f"PNG/SVG export failed for {path.name} ({type(err).__name__}: {str(err)[:120]})"
            written.append(path.name)
    return f"images: {', '.join(written)}" + (f" (drawn by {'; '.join(sorted(engines))})" if engines else "")


def write_report(path, figures: list[go.Figure], title: str, notes: str = "", images: bool = True,
                 plotlyjs: str = "shared") -> str:
    """One HTML page of the figures, plus PNG/SVG copies of them (`export_images`). plotly.js:
    `shared` (one `plotly.min.js` beside the page, written once per folder: opens offline),
    `cdn` or `inline` (embedded: a self-contained ~5 MB file). Returns the image export line."""
    from pathlib import Path

    from spd_lens.figure_files import plotly_script

    path = Path(path)
    exported = export_images(figures, path.parent, path.stem) if images else "PNG/SVG export not requested"
    notes = f"{notes}\n{exported}" if notes else exported
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title>{plotly_script(path.parent, plotlyjs)}"
             "</head><body>", f"<h1>{title}</h1>", f"<pre>{notes}</pre>"]
    for figure in figures:
        parts.append(figure.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return exported


def save_figure(fig: go.Figure, path, *, plotlyjs: str = "shared", engine: str = "auto", **kwargs):
    """`fig` to `.html` (plotly.js `shared` beside it, `cdn` or `inline`), `.png`, `.svg` or `.pdf`
    (kaleido where it works, else matplotlib: no browser needed); see `spd_lens.figure_files`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = save_figure(go.Figure(go.Bar(x=[1], y=[2])), Path(tempfile.mkdtemp()) / "f.png")
        >>> path.stat().st_size > 1000
        True
    """
    from spd_lens.figure_files import save_figure as save

    return save(fig, path, plotlyjs=plotlyjs, engine=engine, **kwargs)


_LABELS = {"energy_share": "share of the layer's gradient energy", "energy": "gradient energy Σσ²",
           "effective_rank": "effective rank", "top_energy": "energy inside the rank-r basis",
           "delta_loss": "Δ correctness loss, head kept in its subspace (P)",
           "delta_loss_remove": "Δ correctness loss, head's subspace removed (I − P)",
           "delta_score": "Δ score, head kept in its subspace (P)",
           "delta_score_remove": "Δ score, head's subspace removed (I − P)"}


def worse_sign(value: str) -> int:
    """+1 where a larger value means the capability got worse (a loss rose), -1 where smaller
    does (a score fell): the colour scales put red on that side."""
    return 1 if "loss" in value else -1


def diverging_scale(values: list[float | None], value: str, scale: str = "clip", quantile: float = 0.95) -> dict:
    """Heatmap settings for a signed change: centred on 0, red where the capability got worse.
    `scale="clip"`: the colour range is ±(the `quantile` of |values|), so one extreme cell does
    not wash out the rest (hover still shows every value); `"symlog"`: z = sign·log10(1 + |v|/c)
    with c a tenth of that range, ticks labelled in the original units; `"linear"`: ±max|v|."""
    if scale not in ("clip", "symlog", "linear"):
        raise SpdLensError(f"scale={scale!r}: use 'clip', 'symlog' or 'linear'")
    present = sorted(abs(v) for v in values if v is not None and not math.isnan(v))
    top = present[-1] if present else 1.0
    reach = top if scale == "linear" or len(present) < 5 else present[int(quantile * (len(present) - 1))]
    reach = reach or top or 1.0
    colours = "RdBu_r" if worse_sign(value) > 0 else "RdBu"  # RdBu: red low, blue high
    if scale != "symlog":
        return {"transform": lambda v: v, "colorscale": colours, "zmid": 0, "zmin": -reach, "zmax": reach,
                "note": f"colours clipped at ±{reach:.3g}" if scale == "clip" and reach < top else ""}
    c = reach / 10

    def transform(v):
        return None if v is None else math.copysign(math.log10(1 + abs(v) / c), v)

    ticks = [0.0] + [t * sign for t in (c, reach, top) for sign in (1, -1)]
    return {"transform": transform, "colorscale": colours, "zmid": 0, "zmin": transform(-top), "zmax": transform(top),
            "tickvals": [transform(t) for t in ticks], "ticktext": [f"{t:.2g}" for t in ticks],
            "note": "symmetric log colour scale"}


def head_attribution_figure(rows: list[dict], value: str = "energy_share", *, scale: str = "clip") -> go.Figure:
    """Layer x KV head heatmaps of an attribution quantity, K and V side by side.

    `value` is `energy_share`, `energy`, `effective_rank` or `top_energy` (per K/V), or
    `delta_loss` / `delta_score` (one panel: both K and V of the head projected onto its
    subspace) and `delta_loss_remove` / `delta_score_remove` (its subspace removed). Changes are
    coloured on a scale centred at 0 with red where the capability gets worse (loss up, score
    down), clipped or symmetric-log (`scale`, see `diverging_scale`); hover shows every value.
    """
    from plotly.subplots import make_subplots

    layers = sorted({r["layer"] for r in rows})
    heads = sorted({r["head"] for r in rows})
    by_key = {(r["layer"], r["head"]): r for r in rows}
    columns = [f"{value}_k", f"{value}_v"] if f"{value}_k" in rows[0] else [value]
    if columns[0] not in rows[0]:
        raise SpdLensError(f"unknown attribution value {value!r}: use energy_share, energy, effective_rank, top_energy, "
                           "delta_loss, delta_loss_remove, delta_score or delta_score_remove")
    signed = value.startswith("delta")
    label = _LABELS.get(value, value.replace("_", " "))
    figure = make_subplots(rows=1, cols=len(columns), horizontal_spacing=0.28,  # room for the left colour bar
                           subplot_titles=[f"{label} ({c[-1].upper()})" for c in columns] if len(columns) > 1 else None)
    notes = set()
    for i, column in enumerate(columns, start=1):
        raw = [[by_key.get((layer, head), {}).get(column) for head in heads] for layer in layers]
        hover = [[f"layer {layer}<br>KV head {head}<br>{column} {by_key[(layer, head)][column]:.4g}"
                  if by_key.get((layer, head), {}).get(column) is not None else "" for head in heads] for layer in layers]
        colorbar = {"x": 0.38 if (i == 1 and len(columns) == 2) else 1.0,
                    "title": {"text": ("Δ loss" if "loss" in value else "Δ score") if signed else value.split("_")[0]}}
        settings = {"colorscale": "Viridis"}
        z = raw
        if signed:
            scaled = diverging_scale([v for row in raw for v in row], value, scale)
            z = [[scaled["transform"](v) if v is not None else None for v in row] for row in raw]
            settings = {k: scaled[k] for k in ("colorscale", "zmid", "zmin", "zmax")}
            if "tickvals" in scaled:
                colorbar.update(tickvals=scaled["tickvals"], ticktext=scaled["ticktext"])
            notes.add(scaled["note"])
        figure.add_trace(go.Heatmap(z=z, x=[f"head {h}" for h in heads], y=layers, hovertext=hover, hoverinfo="text",
                                    colorbar=colorbar, **settings), 1, i)
        figure.update_xaxes(title_text="KV head", row=1, col=i)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    sub = "; ".join(n for n in sorted(notes) if n)
    how = "red = the capability gets worse" + (f"; {sub}" if sub else "") if signed else ""
    figure.update_layout(title=f"which KV heads carry the capability: {label}" + (f"<br><sup>{how}</sup>" if how else ""),
                         height=max(350, 18 * len(layers) + 170), margin={"t": 100})
    return figure


def layer_attribution_figure(rows: list[dict]) -> go.Figure:
    """The layer view of `head_attribution` rows, before the per-head one: above, each layer's
    absolute gradient energy (K and V stacked, so the layer that holds the energy shows); below,
    the correctness-loss change with the whole layer's K and V kept in its subspace (P) and with
    the subspace removed (I − P). Red bars: the capability got worse."""
    from plotly.subplots import make_subplots

    from spd_lens.attribution import layer_rows

    layers = layer_rows(rows)
    if not layers or "layer_energy_k" not in layers[0]:
        raise SpdLensError("these attribution rows have no layer view (made by an older version): run "
                           "head_attribution again")
    x = [str(r["layer"]) for r in layers]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=["gradient energy per layer (absolute Σσ²)",
                                           "Δ correctness loss with the layer projected"])
    for kind, colour in (("k", "#4c78a8"), ("v", "#72b7b2")):
        figure.add_trace(go.Bar(x=x, y=[r[f"layer_energy_{kind}"] for r in layers], name=f"{kind.upper()} energy",
                                marker_color=colour, hovertext=[f"layer {r['layer']}: {r['layer_energy_share']:.1%} of "
                                                                "all layers' energy" for r in layers],
                                hoverinfo="text+y"), row=1, col=1)
    for key, name, edge in (("layer_delta_loss", "kept in subspace (P)", "#1c1c1c"),
                            ("layer_delta_loss_remove", "subspace removed (I − P)", "#868e96")):
        if key not in layers[0]:
            continue
        values = [r[key] for r in layers]
        figure.add_trace(go.Bar(x=x, y=values, name=name, marker={"color": ["#c92a2a" if v > 0 else "#1971c2"
                                                                            for v in values],
                                                                  "line": {"color": edge, "width": 1.5}},
                                hovertemplate=f"layer %{{x}}<br>{name}: Δ loss %{{y:.4g}}<extra></extra>"), row=2, col=1)
    figure.add_hline(y=0, line_color="black", line_width=1, row=2, col=1)
    figure.update_yaxes(title_text="Σσ²", row=1, col=1)
    figure.update_yaxes(title_text="Δ loss (red: worse)", row=2, col=1)
    figure.update_xaxes(title_text="layer", row=2, col=1)
    figure.update_layout(title="which layers carry the capability", barmode="group", height=560,
                         legend={"orientation": "h", "y": -0.15})
    return figure


def overlap_figure(first, second, *, names=("A", "B"), control=None) -> go.Figure:
    """Mean cos² of principal angles between two subspaces per layer and K/V (1 = same subspace);
    with `control` (e.g. `random_like(first)`), the overlap of `second` with it beside."""
    overlap = first.overlap(second)
    keys = sorted(overlap)
    labels = [f"layer {layer} {kind.upper()}" for layer, kind in keys]
    figure = go.Figure(go.Bar(x=labels, y=[overlap[k] for k in keys], name=f"{names[0]} vs {names[1]}",
                              hovertemplate="%{x}<br>overlap %{y:.3f}<extra></extra>"))
    if control is not None:
        baseline = control.overlap(second)
        figure.add_bar(x=labels, y=[baseline[k] for k in keys], name="random control",
                       hovertemplate="%{x}<br>overlap %{y:.3f}<extra></extra>")
    if all(hasattr(overlap[k], "baseline") for k in keys):  # the expectation for random subspaces
        figure.add_scatter(x=labels, y=[overlap[k].baseline for k in keys], mode="markers", name="random (expected)",
                           marker={"symbol": "line-ew-open", "size": 30, "color": "black", "line": {"width": 2}},
                           hovertemplate="%{x}<br>random subspaces of these ranks: %{y:.3f}<extra></extra>")
    figure.update_layout(title=f"subspace overlap: {names[0]} vs {names[1]} (mean cos² of principal angles)",
                         yaxis_title="mean cos²", yaxis_range=[0, 1], barmode="group")
    return figure


def ablation_figure(rows: list[dict], *, x: str = "rank", y: str = "layers", value: str = "score",
                    where: str = "") -> go.Figure:
    """Heatmap of an ablation table: `value` over the grid `x` by `y` (hover names all three);
    `where` names what the rows share otherwise (K/V, alpha, head), for the title."""
    xs = sorted({str(r[x]) for r in rows}, key=_natural)
    ys = sorted({str(r[y]) for r in rows}, key=_natural)
    cell = {(str(r[x]), str(r[y])): r[value] for r in rows}
    z = [[cell.get((a, b)) for a in xs] for b in ys]
    hover = [[f"{x} {a}<br>{y} {b}<br>{value} {cell[(a, b)]:.4g}" if (a, b) in cell else "" for a in xs] for b in ys]
    figure = go.Figure(go.Heatmap(z=z, x=xs, y=ys, hovertext=hover, hoverinfo="text", colorscale="Viridis",
                                  text=[[f"{v:.3f}" if v is not None else "" for v in row] for row in z],
                                  texttemplate="%{text}", colorbar={"title": value}))
    figure.update_layout(title=f"ablation: {value} by {x} and {y}" + (f" ({where})" if where else ""),
                         xaxis_title=x, yaxis_title=y)
    return figure


def control_figure(controls: list[dict], *, baseline: float | None = None, metric: str = "score") -> go.Figure:
    """Per ablation cell, two panels on one axis of cells. Above: the gradient subspace's score
    (the mean over its seeds, each seed a cross) beside the mean of its matched random subspaces
    (each draw a point), and the unprojected model's score. Below: gradient minus random with its
    95% interval, against zero, so a cell's verdict reads without a second scale."""
    from plotly.subplots import make_subplots

    labels = [f"r {c['rank']} L {c['layers']} {c['kinds']} a {c['alpha']}" + ("" if c["head"] == "all" else f" h {c['head']}")
              + (f" {c['mode']}" if c.get("mode") else "") for c in controls]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.06)
    figure.add_trace(go.Bar(x=labels, y=[c["gradient"] for c in controls], name="gradient subspace",
                            marker_color="#4c6ef5"), row=1, col=1)
    figure.add_trace(go.Bar(x=labels, y=[c["random"] for c in controls], name="random subspaces (mean)",
                            marker_color="#adb5bd"), row=1, col=1)
    if any(len(c.get("gradient_scores", [])) > 1 for c in controls):
        figure.add_trace(go.Scatter(x=[lab for c, lab in zip(controls, labels) for _ in c["gradient_scores"]],
                                    y=[v for c in controls for v in c["gradient_scores"]], mode="markers",
                                    name="gradient subspace per seed", marker={"color": "#1c2f8a", "size": 7,
                                                                               "symbol": "x"}), row=1, col=1)
    figure.add_trace(go.Scatter(x=[lab for c, lab in zip(controls, labels) for _ in c["random_draws"]],
                                y=[v for c in controls for v in c["random_draws"]], mode="markers",
                                name="random draws", marker={"color": "black", "size": 5}), row=1, col=1)
    if baseline is not None:
        figure.add_hline(y=baseline, line_dash="dot", row=1, col=1,
                         annotation_text=f"no projection {baseline:.3f}", annotation_position="top left")
    resolved = ["#2b8a3e" if c["ci"][0] > 0 else "#c92a2a" if c["ci"][1] < 0 else "#495057" for c in controls]
    figure.add_trace(go.Scatter(
        x=labels, y=[c["difference"] for c in controls], mode="markers", name="gradient - random (95% CI)",
        marker={"symbol": "diamond", "size": 9, "color": resolved},
        error_y={"type": "data", "array": [c["ci"][1] - c["difference"] for c in controls],
                 "arrayminus": [c["difference"] - c["ci"][0] for c in controls]}), row=2, col=1)
    figure.add_hline(y=0, line_color="black", line_width=1, row=2, col=1)
    figure.update_yaxes(title_text=metric.replace("_", " "), row=1, col=1)
    figure.update_yaxes(title_text="gradient - random<br>(green: 95% CI above 0)", zeroline=True, row=2, col=1)
    figure.update_xaxes(title_text="cell (rank, layers, K/V, alpha, head, mode)", row=2, col=1)
    figure.update_layout(title="gradient vs matched random subspace, per cell"
                               + ("" if metric == "score" else f": {metric.replace('_', ' ')}"),
                         barmode="group", height=620, width=max(700, 200 + 75 * len(labels)),
                         legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"}, margin={"t": 140})
    return figure


def _natural(text: str):
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)
