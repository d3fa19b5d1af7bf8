import csv
from types import SimpleNamespace
import json

import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.attribution import correctness_loss, effective_rank, head_attribution
from spd_lens.cli import main as cli
from spd_lens.extract import encode_examples, extract_subspace
from spd_lens.models import load_hf
from spd_lens.projection import Projection
from spd_lens.subspace import random_like
from spd_lens.tasks import Example, get_task
from spd_lens.viz import (ablation_figure, head_attribution_figure, method_scores_figure, outcome_figure, overlap_figure,
                          spectrum_figure)


@pytest.fixture(scope="module")
def tiny():
    return load_hf("tiny")


def test_effective_rank():
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)


def test_attribution_rows_cover_every_layer_and_head(tiny):
    model, tokenizer = tiny
    rows = head_attribution(model, "arithmetic", n=3, tokenizer=tokenizer, score_top=2, score_n=3, modes=["keep"])
    assert [(r["layer"], r["head"]) for r in rows] == [(l, h) for l in range(4) for h in range(2)]
    for layer in range(4):
        shares = [r["energy_share_k"] for r in rows if r["layer"] == layer]
        assert sum(shares) == pytest.approx(1.0)
    assert sum(r["delta_score"] is not None for r in rows) == 2
    # delta_loss is the loss with that head projected minus the baseline: recompute one.
    row = rows[5]
    subspace = extract_subspace(model, "arithmetic", n=3, layers=list(range(4)), tokenizer=tokenizer)
    _, encoded = encode_examples(model, "arithmetic", n=3, split="train", seed=0, tokenizer=tokenizer)
    with Projection.build(subspace, layers=[row["layer"]], layout="head", heads=[row["head"]]).apply(model):
        projected = correctness_loss(model, encoded, pad_id=tokenizer.pad_token_id)
    assert projected - row["baseline_loss"] == pytest.approx(row["delta_loss"], abs=1e-6)


def test_figures_name_what_they_show(tiny):
    model, tokenizer = tiny
    rows = head_attribution(model, "arithmetic", n=2, tokenizer=tokenizer, score_top=0)
    energy = head_attribution_figure(rows, "energy_share")
    assert len(energy.data) == 2 and "layer" in energy.data[0].hovertext[0][0]
    assert len(head_attribution_figure(rows, "delta_loss").data) == 1
    with pytest.raises(SpdLensError, match="unknown attribution value"):
        head_attribution_figure(rows, "nonsense")
    a = extract_subspace(model, "arithmetic", n=3, tokenizer=tokenizer)
    b = extract_subspace(model, "family-mc", n=3, tokenizer=tokenizer)
    overlap = overlap_figure(a, b, names=("arithmetic", "family-mc"), control=random_like(a))
    assert len(overlap.data) == 3 and all(0 <= v <= 1 for v in overlap.data[0].y)
    assert overlap.data[2].name == "random (expected)"  # the analytic baseline beside the bars
    assert list(overlap.data[2].y) == [v.baseline for _, v in sorted(a.overlap(b).items())]
    spectrum = spectrum_figure(a, "v")
    assert any("chosen rank" in trace.name for trace in spectrum.data)
    table = [{"rank": r, "layers": l, "score": r / 10} for r in (2, 4) for l in ("1", "3")]
    grid = ablation_figure(table, x="rank", y="layers", value="score")
    assert grid.data[0].z == ((0.2, 0.4), (0.2, 0.4)) or [list(r) for r in grid.data[0].z] == [[0.2, 0.4], [0.2, 0.4]]
    metrics = {"task": "t", "model": "m", "methods": {"base": {"score": 0.1, "ci": [0.0, 0.2], "n": 10}}}
    assert "95% CI" in method_scores_figure(metrics).data[0].hovertext[0]
    assert len(method_scores_figure(metrics).data) == 1  # no seeds, no seed markers
    metrics["methods"]["spd"] = {"score": 0.3, "ci": [0.2, 0.4], "n": 20,
                                 "seeds": {"0": {"score": 0.1}, "1": {"score": 0.5}}}
    seeds = method_scores_figure(metrics).data[1]
    assert list(seeds.x) == ["spd", "spd"] and list(seeds.y) == [0.1, 0.5]


def test_head_attribution_plain_route_remove_mode_and_layer_view():
    from spd_lens import load_model
    from spd_lens.attribution import hooks_on, layer_rows, span_accuracy
    from spd_lens.viz import layer_attribution_figure

    bridge = load_model("tiny")
    mine = [Example(f"mine/{i}", f"What is {i} + 7?", str(i + 7), ((0, len(str(i + 7))),)) for i in range(3)]
    subspace = extract_subspace(bridge, mine, layers=[1, 3], rank=2)
    plain = head_attribution(bridge, mine, subspace=subspace)  # no hooks on: through the plain model
    assert not hooks_on(bridge) and getattr(bridge, "_spd_lens_unbooted", None) is not None
    through = head_attribution(bridge, mine, subspace=subspace, route="bridge")
    assert [sorted(r) for r in plain] == [sorted(r) for r in through]
    for a, b in zip(plain, through):  # the same rows either way
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], abs=1e-5), key
    # remove = the head's subspace projected out (I - P); keep and remove differ.
    row = plain[3]
    with Projection.build(subspace, layers=[row["layer"]], layout="head", heads=[row["head"]],
                          complement=True).apply(bridge):
        removed = correctness_loss(bridge, mine)
    assert removed - row["baseline_loss"] == pytest.approx(row["delta_loss_remove"], abs=1e-5)
    assert row["delta_loss_remove"] != pytest.approx(row["delta_loss"], abs=1e-9)
    # The layer view: absolute energies (shares of all layers add to one), whole-layer projections.
    layers = layer_rows(plain)
    assert [r["layer"] for r in layers] == [1, 3]
    assert sum(r["layer_energy_share"] for r in layers) == pytest.approx(1.0)
    with Projection.build(subspace, layers=[3]).apply(bridge):
        assert correctness_loss(bridge, mine) - row["baseline_loss"] == pytest.approx(layers[1]["layer_delta_loss"],
                                                                                      abs=1e-5)
    assert plain[0]["energy_k"] + plain[1]["energy_k"] == pytest.approx(layers[0]["layer_energy_k"], rel=1e-6)
    figure = layer_attribution_figure(plain)
    assert figure.layout.xaxis2.title.text == "layer" and len(figure.data) == 4
    # A hook of your own on the bridge: auto goes through the bridge, so the hook applies.
    calls = []
    bridge.hook_dict["blocks.1.attn.hook_k"].add_hook(lambda t, hook: calls.append(1) or t)
    try:
        assert hooks_on(bridge)
        head_attribution(bridge, mine, subspace=subspace, modes=["remove"], layers=[1])
        assert calls
    finally:
        bridge.reset_hooks()
    with pytest.raises(SpdLensError, match="modes"):
        head_attribution(bridge, mine, subspace=subspace, modes=["drop"])
    # Per example: the loss and the teacher-forced span accuracy, in the examples' order.
    losses = correctness_loss(bridge, mine, reduction="none")
    assert len(losses) == 3 and sum(losses) / 3 == pytest.approx(correctness_loss(bridge, mine))
    spans = span_accuracy(bridge, mine, reduction="none")
    assert len(spans) == 3 and set(spans) <= {0.0, 1.0}
    with pytest.raises(SpdLensError, match="reduction='sum'"):
        correctness_loss(bridge, mine, reduction="sum")


def test_span_accuracy_is_one_exactly_when_every_span_token_is_the_top_prediction(tiny):
    from spd_lens.attribution import span_accuracy

    model, tokenizer = tiny
    mine = [Example(f"mine/{i}", f"What is {i} + 7?", str(i + 7), ((0, len(str(i + 7))),)) for i in range(6)]
    _, encoded = encode_examples(model, mine, n=None, split="train", seed=0, tokenizer=tokenizer)
    with torch.no_grad():
        for example, value in zip(encoded, span_accuracy(model, encoded, tokenizer=tokenizer, reduction="none")):
            ids = torch.tensor([example.input_ids])
            top = model(ids).logits[0].argmax(-1)
            positions = [p for p, c in enumerate(example.correctness_mask) if c and p > 0]
            assert value == float(all(top[p - 1] == example.input_ids[p] for p in positions))


def test_change_heatmaps_are_centred_clipped_and_red_where_worse():
    from spd_lens.viz import diverging_scale

    rows = [{"layer": l, "head": h, "delta_loss": 0.01 * (l + h), "delta_score": -0.01 * h} for l in range(4)
            for h in range(3)]
    rows[5]["delta_loss"] = 10.0  # one extreme cell
    loss = head_attribution_figure(rows, "delta_loss")
    trace = loss.data[0]
    assert trace.zmid == 0 and trace.zmax < 10.0 and trace.zmin == -trace.zmax  # clipped, centred
    assert trace.colorscale[-1][1] in ("rgb(103,0,31)", "#67001f") or "red" in loss.layout.title.text
    assert loss.layout.xaxis.title.text == "KV head" and loss.layout.yaxis.title.text == "layer"
    assert "red = the capability gets worse" in loss.layout.title.text
    score = head_attribution_figure(rows, "delta_score").data[0]
    # A loss that rises and a score that falls are both red: the scales are mirrored.
    assert [c for _, c in trace.colorscale] == [c for _, c in score.colorscale][::-1]
    symlog = head_attribution_figure(rows, "delta_loss", scale="symlog").data[0]
    assert max(v for row in symlog.z for v in row if v is not None) < 10.0 and symlog.colorbar.ticktext
    assert diverging_scale([1.0, -2.0], "delta_loss", "linear")["zmax"] == 2.0
    with pytest.raises(SpdLensError, match="scale='log'"):
        head_attribution_figure(rows, "delta_loss", scale="log")


def test_outcome_figure_stacks_shares_and_pools_rare_kinds():
    metrics = {"task": "humaneval", "methods": {
        "base": {"outcomes": {"AssertionError": 6, "passed": 2, "SyntaxError": 1, "NameError": 1}},
        "spd": {"outcomes": {"AssertionError": 10, "SyntaxError": 6, "passed": 4}}}}
    figure = outcome_figure(metrics, top=3)
    assert [trace.name for trace in figure.data] == ["passed", "AssertionError", "SyntaxError", "other"]
    for column in range(2):  # each method's shares add up to one
        assert sum(trace.y[column] for trace in figure.data) == pytest.approx(1.0)
    assert figure.data[0].y == (0.2, 0.2) and figure.data[3].y == (0.1, 0.0)
    assert "NameError" not in [trace.name for trace in figure.data]
    with pytest.raises(SpdLensError, match="no method of run .* has 'answers' counts"):
        outcome_figure(metrics, "answers")


def test_report_redraws_ablation_and_head_tables(tmp_path, capsys):
    ablation = tmp_path / "ablation"
    ablation.mkdir()
    rows = [{"rank": "none", "layers": "none", "score": 0.1, "loss": 3.0, "delta_loss": 0.0}]
    rows += [{"rank": r, "layers": l, "score": r / 10, "loss": 3.0, "delta_loss": 0.1} for r in (2, 4) for l in ("1", "3")]
    (ablation / "ablation.json").write_text(json.dumps({"rows": rows, "task": "arithmetic"}))
    assert cli(["report", str(ablation)]) == 0
    assert "score by rank and layers" in (ablation / "ablation.html").read_text()
    heads = tmp_path / "heads"
    heads.mkdir()
    row = {"energy_share_k": 0.5, "energy_share_v": 0.5, "effective_rank_k": 1.0, "effective_rank_v": 2.0,
           "delta_loss": 0.01}
    head_rows = [{"layer": layer, "head": head, **row} for layer in range(2) for head in range(2)]
    (heads / "heads.json").write_text(json.dumps({"task": "arithmetic", "model": "tiny", "rows": head_rows}))
    assert cli(["report", str(heads)]) == 0
    assert "which heads carry arithmetic" in (heads / "heads.html").read_text()
    (heads / "heads.json").write_text("[1, 2]")
    assert cli(["report", str(heads)]) == 2
    assert "head-attribution table" in capsys.readouterr().err


def test_ablation_report_draws_one_grid_per_kv_setting_and_controls_in_two_panels(tmp_path, monkeypatch):
    import spd_lens.viz as viz
    from spd_lens.ablate import write_ablation_report

    rows = [{"rank": "none", "layers": "none", "score": 0.1, "loss": 3.0, "delta_loss": 0.0}]
    score = {("2", "k"): 0.1, ("4", "k"): 0.2, ("2", "v"): 0.3, ("4", "v"): 0.4}
    rows += [{"rank": r, "layers": "1", "kinds": k, "alpha": 1.0, "head": "all", "subspace": "gradient",
              "score": score[(str(r), k)], "loss": 3.0, "delta_loss": 0.1} for r in (2, 4) for k in ("k", "v")]
    controls = [{"rank": r, "layers": "1", "kinds": k, "alpha": 1.0, "head": "all", "gradient": score[(str(r), k)],
                 "random": 0.1, "random_draws": [0.05, 0.15], "difference": score[(str(r), k)] - 0.1,
                 "ci": [score[(str(r), k)] - 0.15, score[(str(r), k)] - 0.05]} for r in (2, 4) for k in ("k", "v")]
    (tmp_path / "ablation.json").write_text(json.dumps({"rows": rows, "controls": controls, "task": "arithmetic"}))
    drawn = []
    monkeypatch.setattr(viz, "write_report", lambda path, figures, *args, **kwargs: drawn.extend(figures))
    write_ablation_report(tmp_path)
    titles = [f.layout.title.text for f in drawn]
    assert titles[0].startswith("gradient vs matched random subspace")
    # Cells differing only in K/V get a grid each: drawn together, one would overwrite the other.
    assert sum("score by rank and layers" in t for t in titles) == 2 and any("kinds v" in t for t in titles)
    grid_v = next(f for f in drawn if "score by rank and layers" in f.layout.title.text and "kinds v" in f.layout.title.text)
    assert [list(row) for row in grid_v.data[0].z] == [[0.3, 0.4]]
    # Differences sit in their own panel against zero, coloured by whether the interval clears it.
    difference = next(t for t in drawn[0].data if t.name == "gradient - random (95% CI)")
    assert difference.yaxis == "y2" and list(difference.marker.color)[3] == "#2b8a3e"
    assert list(difference.marker.color)[0] == "#495057"


def test_ablate_cli_table_figure_and_resume(tmp_path, capsys):
    config = tmp_path / "a.toml"
    config.write_text('name = "t"\n[model]\nname = "tiny"\n[task]\neval_n = 3\n[subspace]\nn = 2\nlayers = [1, 3]\n'
                      '[eval]\nmax_new_tokens = 3\n[ablate]\nranks = [2, 4, 8]\nloss_n = 2\n')
    out = tmp_path / "run"
    assert cli(["ablate", str(config), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert len(rows) == 1 + 3 * 2 and rows[0]["rank"] == "none"
    assert {(r["rank"], r["layers"]) for r in rows[1:]} == {(r, l) for r in ("2", "4", "8") for l in ("1", "3")}
    assert (out / "ablation.html").stat().st_size > 10_000
    lines = (out / "ablation.jsonl").read_text().splitlines()
    (out / "ablation.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-write
    assert cli(["ablate", str(config), "--out", str(out)]) == 0
    again = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    assert len({json.dumps({k: r[k] for k in ("rank", "layers")}) for r in again}) == 7


def test_ablate_cli_names_each_rows_mode_in_its_table_csv_and_controls(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text('name = "m"\n[model]\nname = "tiny"\n[task]\neval_n = 3\n[subspace]\nn = 2\nlayers = [1, 3]\n'
                      '[eval]\nmax_new_tokens = 2\n[ablate]\nranks = [4]\nlayer_sets = [[1]]\nloss_n = 2\n'
                      'random_draws = 1\nmodes = ["keep", "remove"]\n')
    out = tmp_path / "run"
    assert cli(["ablate", str(config), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [(r["mode"], r["subspace"]) for r in rows] == [("", "none"), ("keep", "gradient"), ("keep", "random"),
                                                         ("remove", "gradient"), ("remove", "random")]
    printed = capsys.readouterr().out
    assert printed.count(" remove ") >= 2 and "gradient - random per cell" in printed
    assert "head all remove:" in printed and "head all keep:" in printed


def test_ablation_cells_have_matched_random_controls(tmp_path):
    import dataclasses

    from spd_lens.ablate import run_ablation
    from spd_lens.config import config_from_dict

    config = config_from_dict({
        "name": "gate", "model": {"name": "tiny"}, "task": {"eval_n": 4, "eval_split": "dev"},
        "subspace": {"n": 2, "layers": [1, 3]}, "eval": {"max_new_tokens": 3},
        "ablate": {"ranks": [4], "energies": [0.9], "layer_sets": [[1]], "kind_sets": [["k"], ["k", "v"]],
                   "random_draws": 2, "loss_n": 2}})
    rows = run_ablation(config, tmp_path / "gate")
    # baseline + (rank 4, energy 0.9) x (K, K+V) x (gradient + 2 random draws)
    assert len(rows) == 1 + 2 * 2 * 3
    assert {(r["rank"], r["kinds"], r["subspace"], r["draw"]) for r in rows[1:]} == {
        (p, k, s, d) for p in (4, "energy=0.9") for k in ("k", "k,v") for s, d in (("gradient", None), ("random", 0),
                                                                                  ("random", 1))}
    assert all(r["split"] == "dev" and len(r["outcomes"]) == 4 and r["seconds"] >= 0 for r in rows)
    assert all(e.startswith("arithmetic/dev/") for e in rows[0]["outcomes"])
    table = json.loads((tmp_path / "gate" / "ablation.json").read_text())
    assert len(table["controls"]) == 4
    for c in table["controls"]:
        assert len(c["random_draws"]) == 2 and c["ci"][0] <= c["difference"] <= c["ci"][1]
        assert c["difference"] == pytest.approx(c["gradient"] - c["random"])
    assert "gradient vs matched random subspace" in (tmp_path / "gate" / "ablation.html").read_text()
    # report recomputes the controls from the rows (a table written by another version is brought up to date).
    (tmp_path / "gate" / "ablation.json").write_text(json.dumps({**table, "controls": []}))
    assert cli(["report", str(tmp_path / "gate")]) == 0
    assert json.loads((tmp_path / "gate" / "ablation.json").read_text())["controls"] == table["controls"]
    # A random draw projects onto another subspace of the same ranks: its correctness loss differs.
    k_rows = [r for r in rows if r["rank"] == 4 and r["kinds"] == "k"]
    assert len({round(r["loss"], 9) for r in k_rows}) == 3
    with pytest.raises(SpdLensError, match="ablate.kind_sets"):
        run_ablation(dataclasses.replace(config, ablate=dataclasses.replace(config.ablate, kind_sets=[["q"]])),
                     tmp_path / "bad")


def test_heads_cli_writes_table_and_figures(tmp_path, capsys):
    assert cli(["heads", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--score-top", "1", "--score-n", "2",
                "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "heads.json").read_text())["rows"]
    assert len(rows) == 8 and (tmp_path / "heads.csv").is_file() and (tmp_path / "heads.html").is_file()
    assert "layer" in capsys.readouterr().out


def test_report_cli(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_report_exports_images_where_it_can(tmp_path, monkeypatch):
    import builtins
    import sys
    import types

    import plotly.graph_objects as go

    from spd_lens.viz import write_report

    figure = go.Figure(go.Bar(x=[1], y=[2]))
    # Without kaleido: matplotlib draws the images (no browser needed), and the line says so.
    real_import = builtins.__import__

    def no_kaleido(name, *args, **kwargs):
        if name == "kaleido":
            raise ImportError("no kaleido")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kaleido)
    line = write_report(tmp_path / "a.html", [figure], "t")
    assert "matplotlib" in line and (tmp_path / "a-1.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "a-1.svg").read_text()
    monkeypatch.setattr(builtins, "__import__", real_import)
    # With a renderer: kaleido writes one PNG and one SVG per figure, named after the report.
    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))
    monkeypatch.setattr(go.Figure, "write_image", lambda self, path, **kw: open(path, "w").write("img"))
    line = write_report(tmp_path / "b.html", [figure, figure], "t")
    assert sorted(p.name for p in tmp_path.glob("b-*")) == ["b-1.png", "b-1.svg", "b-2.png", "b-2.svg"]
    assert "b-2.svg" in line and "kaleido" in line and (tmp_path / "b-1.png").read_text() == "img"
    # A renderer that fails (no browser): matplotlib draws instead, the HTML still written.
    def broken(self, path, **kw):
        raise RuntimeError("no Chrome found")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    assert "no Chrome found" in write_report(tmp_path / "c.html", [figure], "t")
    assert (tmp_path / "c.html").is_file() and (tmp_path / "c-1.png").read_bytes()[:4] == b"\x89PNG"
    # The pages share one plotly.js beside them instead of embedding 4.8 MB each.
    assert sorted(p.name for p in tmp_path.glob("*.js")) == ["plotly.min.js"]
    assert all((tmp_path / f"{n}.html").stat().st_size < 100_000 for n in "abc")
    write_report(tmp_path / "d.html", [figure], "t", plotlyjs="inline", images=False)
    assert (tmp_path / "d.html").stat().st_size > 1_000_000


def test_save_figure_draws_heatmaps_bars_and_subplots_without_a_browser(tmp_path):
    import json

    from spd_lens.ablate import controls
    from spd_lens.viz import control_figure, save_figure

    rows = [{"layer": l, "head": h, "energy_share_k": 0.5, "energy_share_v": 0.5, "delta_loss": (l - 1) * h}
            for l in range(3) for h in range(2)]
    cell = {"rank": 8, "layers": "1", "alpha": 1.0, "head": "all", "kinds": "k"}
    table = [{**cell, "subspace": s, "draw": d, "seed": 0, "score": 0.5,
              "outcomes": {f"q{i}": int((i + (d or 0)) % 2) for i in range(6)}} for s, d in (("gradient", None),
                                                                                      ("random", 0), ("random", 1))]
    for figure, name in ((head_attribution_figure(rows, "delta_loss"), "heads"),
                         (control_figure(controls(table), baseline=0.5), "controls")):
        path = save_figure(figure, tmp_path / f"{name}.png", engine="matplotlib")
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5_000
        assert "<svg" in save_figure(figure, tmp_path / f"{name}.svg", engine="matplotlib").read_text()
    html = save_figure(figure, tmp_path / "page.html", plotlyjs="cdn")
    assert "cdn.plot.ly" in html.read_text() and not (tmp_path / "plotly.min.js").exists()
    with pytest.raises(SpdLensError, match="plotlyjs='web'"):
        save_figure(figure, tmp_path / "x.html", plotlyjs="web")
    with pytest.raises(SpdLensError, match="save a figure as"):
        save_figure(figure, tmp_path / "x.gif")
    assert json.loads(figure.to_json())  # the figure itself untouched by drawing it


def test_attribution_takes_your_own_examples(tiny):
    model, tokenizer = tiny
    mine = [Example(f"mine/{i}", f"What is {i} + 7?", str(i + 7), ((0, len(str(i + 7))),)) for i in range(3)]
    rows = head_attribution(model, mine, layers=[1, 3], tokenizer=tokenizer)
    assert [(r["layer"], r["head"]) for r in rows] == [(l, h) for l in (1, 3) for h in range(2)]
    assert all(r["delta_score"] is None for r in rows)  # no task, no scorer: nothing to score
    assert rows[0]["baseline_loss"] == pytest.approx(correctness_loss(model, mine, tokenizer=tokenizer))
    assert len(head_attribution(model, mine, n=1, layers=[3], tokenizer=tokenizer)) == 2
    with pytest.raises(SpdLensError, match="score_top=2 needs a task.*score_task="):
        head_attribution(model, mine, layers=[3], score_top=2, tokenizer=tokenizer)
    scored = head_attribution(model, mine, layers=[3], score_top=1, score_task="arithmetic", score_n=2,
                              tokenizer=tokenizer)
    assert sum(r["delta_score"] is not None for r in scored) == 1


def test_correctness_loss_takes_examples_or_a_task(tiny):
    model, tokenizer = tiny
    _, encoded = encode_examples(model, "arithmetic", n=3, split="train", seed=0, tokenizer=tokenizer)
    reference = correctness_loss(model, encoded, pad_id=tokenizer.pad_token_id)
    assert correctness_loss(model, "arithmetic", n=3, tokenizer=tokenizer) == pytest.approx(reference)
    examples = get_task("arithmetic").examples("train", n=3, seed=0)
    assert correctness_loss(model, examples, tokenizer=tokenizer) == pytest.approx(reference)
    # By hand: the mean over examples of the mean NLL of each one's correctness tokens.
    total = 0.0
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        targets = [p for p, c in enumerate(e.correctness_mask) if c]
        nll = torch.nn.functional.cross_entropy(logits[[p - 1 for p in targets]], ids[0, targets])
        total += float(nll)
    assert reference == pytest.approx(total / len(encoded), rel=1e-5)


def test_sampled_ablation_uses_self_generation_settings_and_scores_each_question_by_its_mean(tmp_path, monkeypatch):
    import dataclasses

    import spd_lens.ablate as ablate
    from spd_lens.config import config_from_dict

    seen = []
    real_sample = ablate.sample

    def recording_sample(model, tokenizer, prompts, config, **kwargs):
        seen.append(config)
        return real_sample(model, tokenizer, prompts, config, **kwargs)

    monkeypatch.setattr(ablate, "sample", recording_sample)
    # The tiny model never answers right; score a completion by its length, so means over samples vary.
    monkeypatch.setattr(ablate, "score_records", lambda task, examples, records: SimpleNamespace(
        results=[{"prompt_id": r["prompt_id"], "passed": len(r["completion"]) % 2} for r in records]))
    raw = {"name": "gate", "model": {"name": "tiny"}, "task": {"eval_n": 4, "eval_split": "dev"},
           "subspace": {"n": 2, "layers": [1]}, "eval": {"max_new_tokens": 5}, "sampling": {"temperature": 1.0},
           "ablate": {"ranks": [4], "layer_sets": [[1]], "random_draws": 1, "loss_n": 2, "decoding": "sampling",
                      "samples": 3}}
    rows = ablate.run_ablation(config_from_dict(raw), tmp_path / "sampled")
    assert {(c.temperature, c.top_k, c.top_p, c.num_samples) for c in seen} == {(1.0, 20, 0.8, 3)}
    assert all(c.max_new_tokens == 40 for c in seen)  # the task's budget, as self-generation uses
    for row in rows:
        assert set(row["outcomes"].values()) <= {0, 1 / 3, 2 / 3, 1}
        assert row["score"] == pytest.approx(sum(row["outcomes"].values()) / 4)
    assert any(0 < v < 1 for r in rows for v in r["outcomes"].values())
    table = json.loads((tmp_path / "sampled" / "ablation.json").read_text())
    assert table["decoding"]["num_samples"] == 3 and table["decoding"]["temperature"] == 1.0
    assert config_from_dict(raw).to_dict()["ablate"]["decoding"] == "sampling"
    greedy = config_from_dict({**raw, "ablate": {**raw["ablate"], "decoding": "greedy"}})
    assert "decoding" not in greedy.to_dict()["ablate"]  # run directories made before the setting still match
    with pytest.raises(SpdLensError, match='decoding = "sampling"'):
        ablate.run_ablation(greedy, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(SpdLensError, match="ablate.decoding must be"):
        ablate.run_ablation(dataclasses.replace(greedy, ablate=dataclasses.replace(greedy.ablate, decoding="beam")),
                            tmp_path / "bad2")
    warm = config_from_dict({**raw, "eval": {"temperature": 0.7}, "ablate": {**raw["ablate"], "decoding": "greedy",
                                                                             "samples": 1}})
    with pytest.raises(SpdLensError, match=r"\[eval\] temperature = 0.7, but the ablation decodes greedily"):
        ablate.run_ablation(warm, tmp_path / "bad3")
    from spd_lens.plan import make_plan

    assert any("ablate.samples = 3 needs sampled cells" in e for e in make_plan(greedy, ablate=True).errors)
    # A directory of sampled rows is not resumed as a greedy ablation (nor the other way round).
    with pytest.raises(SpdLensError, match="differs in ablate.decoding: run has 'sampling', now 'greedy'"):
        ablate.run_ablation(config_from_dict({**raw, "ablate": {**raw["ablate"], "decoding": "greedy", "samples": 1}}),
                            tmp_path / "sampled")


def test_ablation_runs_each_cell_once_per_subspace_seed_and_draws_fixed_rank_controls_once(tmp_path, monkeypatch):
    import spd_lens.ablate as ablate
    from spd_lens.config import config_from_dict

    raw = {"name": "seeds", "seeds": [0], "model": {"name": "tiny"}, "task": {"eval_n": 4, "eval_split": "dev"},
           "subspace": {"n": 2, "layers": [1, 3]}, "eval": {"max_new_tokens": 3},
           "ablate": {"ranks": [4], "energies": [0.9], "layer_sets": [[1]], "random_draws": 1, "loss_n": 2,
                      "subspace_seeds": [0, 1]}}
    rows = ablate.run_ablation(config_from_dict(raw), tmp_path / "gate")
    # baseline; rank 4: gradient x 2 seeds + 1 draw (its ranks do not depend on the seed);
    # energy 0.9: gradient x 2 seeds + 1 draw per seed (ranks chosen from each seed's spectrum).
    assert [(r["rank"], r["subspace"], r["seed"], r["draw"]) for r in rows] == [
        ("none", "none", None, None), (4, "gradient", 0, None), (4, "gradient", 1, None), (4, "random", None, 0),
        ("energy=0.9", "gradient", 0, None), ("energy=0.9", "gradient", 1, None), ("energy=0.9", "random", 0, 0),
        ("energy=0.9", "random", 1, 0)]
    # Two extractions, two subspaces: the seed-1 row projects onto another subspace than seed 0's.
    assert sorted(p.name for p in (tmp_path / "gate" / "subspaces").iterdir()) == ["gradient-seed0", "gradient-seed1"]
    assert rows[1]["loss"] != pytest.approx(rows[2]["loss"], abs=1e-9)
    table = json.loads((tmp_path / "gate" / "ablation.json").read_text())
    by_rank = {c["rank"]: c for c in table["controls"]}
    assert by_rank[4]["gradient_seeds"] == [0, 1] and len(by_rank[4]["random_draws"]) == 1
    assert by_rank[4]["gradient"] == pytest.approx((rows[1]["score"] + rows[2]["score"]) / 2)
    assert len(by_rank["energy=0.9"]["random_draws"]) == 2
    for c in table["controls"]:
        assert c["ci"][0] <= c["difference"] <= c["ci"][1]
    # A directory written before rows named their seed resumes: those rows are the first seed's.
    one_seed = config_from_dict({**raw, "ablate": {k: v for k, v in raw["ablate"].items() if k != "subspace_seeds"}})
    assert "subspace_seeds" not in one_seed.to_dict()["ablate"]  # run directories made before the setting match
    ablate.run_ablation(one_seed, tmp_path / "old")
    lines = [json.loads(line) for line in (tmp_path / "old" / "ablation.jsonl").read_text().splitlines()]
    (tmp_path / "old" / "ablation.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "seed"}) + "\n"
                                                             for r in lines))
    monkeypatch.setattr(ablate, "sample", lambda *a, **k: pytest.fail("a finished row was run again"))
    again = ablate.run_ablation(one_seed, tmp_path / "old")
    assert [r["seed"] for r in again] == [None, 0, None, 0, 0]
    # The grid may grow in a directory (here: a second subspace seed): only the new rows run.
    calls = []
    monkeypatch.setattr(ablate, "sample", lambda model, tokenizer, prompts, config, **k: calls.append(1) or
                        [["1"] for _ in prompts])
    grown = ablate.run_ablation(config_from_dict({**raw, "name": "grown"}), tmp_path / "old")
    assert [r["seed"] for r in csv.DictReader(open(tmp_path / "old" / "ablation.csv"))][:3] == ["", "0", "1"]
    assert len(calls) == 3 and len(grown) == 8
    assert [r["seed"] for r in grown if r["subspace"] != "none"] == [0, 1, None, 0, 1, 0, 1]
    with pytest.raises(SpdLensError, match="differs in ablate.loss_n"):
        ablate.run_ablation(config_from_dict({**raw, "ablate": {**raw["ablate"], "loss_n": 3}}), tmp_path / "old")
    with pytest.raises(SpdLensError, match=r"ablate.subspace_seeds = \[1, 1\]"):
        ablate.run_ablation(config_from_dict({**raw, "ablate": {**raw["ablate"], "subspace_seeds": [1, 1]}}),
                            tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_controls_never_pair_a_gradient_seed_with_a_random_draw():
    from spd_lens.ablate import controls

    cell = {"rank": 8, "layers": "1", "alpha": 1.0, "head": "all", "kinds": "k,v"}

    def row(subspace, outcomes, **extra):
        scores = dict(zip("abcd", outcomes))
        return {**cell, "subspace": subspace, "outcomes": scores, "score": sum(outcomes) / 4, **extra}

    rows = [row("gradient", [1, 1, 0, 0], seed=0), row("gradient", [1, 1, 1, 1], seed=1),
            row("random", [0, 0, 0, 0], seed=None, draw=0), row("random", [1, 1, 0, 0], seed=None, draw=1)]
    (c,) = controls(rows)
    assert c["gradient"] == 0.75 and c["random"] == 0.25 and c["difference"] == 0.5
    # Paired by position, seed i against draw i, both differences would be 0.5 (no spread); the
    # seeds are unrelated to the draws, so each side's spread shows: 0.25 .. 0.75.
    assert c["seed_spread"] == 0.5


def test_overlap_carries_its_random_baseline_and_draws_agree():
    import statistics

    from spd_lens.subspace import CapabilitySubspace, Overlap

    g = torch.randn(80, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = CapabilitySubspace.from_grams({(0, "k"): g.T @ g}, {"n_kv_heads": 2, "d_head": 8})
    a, b = s.with_rank(rank=3), s.with_rank(rank=6)
    for normalize, expected in (("smaller", 6 / 16), ("larger", 3 / 16)):
        draws = [float(random_like(a, seed=i).overlap(random_like(b, seed=10_000 + i), normalize=normalize)[(0, "k")])
                 for i in range(100)]
        value = a.overlap(b, normalize=normalize)[(0, "k")]
        assert isinstance(value, Overlap) and value.baseline == pytest.approx(expected) and value.dim == 16
        # The analytic baseline is the mean over random pairs (within 4 standard errors).
        assert abs(statistics.mean(draws) - expected) < 4 * statistics.stdev(draws) / len(draws) ** 0.5
    per_head = a.overlap(b, head=1)[(0, "k")]
    assert per_head.dim == 8 and per_head.baseline == pytest.approx(max(per_head.ranks) / 8)
    top = s.overlap(random_like(s), rank=2)[(0, "k")]
    assert top.ranks == (2, 2) and top.baseline == pytest.approx(2 / 16) and top.excess == pytest.approx(top - 2 / 16)
    with pytest.raises(SpdLensError, match="overlap rank"):
        s.overlap(s, rank=0)


def test_offline_figures_keep_long_tick_labels_on_the_page(tmp_path):
    # An ablation table's cell names ("r 128 L 9,17 k,v a 1.0 keep") are rotated and reach below the
    # axes: the page must hold them (the offline renderer cut them, and the axis title, off).
    import matplotlib.image as mpimg
    import plotly.graph_objects as go

    from spd_lens.viz import save_figure

    figure = go.Figure(go.Bar(x=[f"r {r} L 9,17 k,v a 1.0 keep {i}" for i, r in enumerate([8, 32, 128] * 6)],
                              y=list(range(18))))
    figure.update_layout(xaxis_title="cell (rank, layers, K/V, alpha, head, mode)")
    image = mpimg.imread(save_figure(figure, tmp_path / "cells.png", engine="matplotlib"))[..., :3]
    for edge in (image[0], image[-1], image[:, 0], image[:, -1]):
        assert edge.min() > 0.95  # nothing drawn touches the page's edge: nothing was cut off there
