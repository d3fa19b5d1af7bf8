"""spd_lens.ablate(model, examples, ...): the keep/remove grid with random controls on your own examples."""

import builtins
import json

import pytest

import spd_lens
from spd_lens import SpdLensError
from spd_lens.attribution import correctness_loss, span_accuracy
from spd_lens.tasks import Example

EXAMPLES = [Example(f"add/{i}", f"What is {i} + 2?", str(i + 2), [[0, len(str(i + 2))]]) for i in range(3)]


@pytest.fixture(scope="module")
def setting():
    model = spd_lens.load_model("tiny")
    return model, spd_lens.extract_subspace(model, EXAMPLES, layers=[1, 3])


def test_ablate_grid_rows_controls_resume_and_files(setting, tmp_path, monkeypatch):
    import spd_lens.ablate_examples as grid

    model, sub = setting
    out = tmp_path / "grid"
    table = spd_lens.ablate(model, EXAMPLES, subspace=sub, ranks=[2], layer_sets=[[3]], random_draws=3,
                            max_new_tokens=2, out=out)
    assert list(table["source"]) == ["none"] + ["gradient", "random", "random", "random"] * 2
    assert list(table["mode"]) == ["none"] + ["keep"] * 4 + ["remove"] * 4
    assert table["draw"].iloc[1:5].tolist()[1:] == [0, 1, 2] and table["draw"].isna().iloc[:2].all()
    seeds = table["random_seed"].dropna().tolist()
    assert len(seeds) == 6 and len(set(seeds)) == 3  # keep and remove cells share each draw's subspace
    assert all(s >= 1000 for s in seeds)  # a control_seed stream, never a legacy 0..999 seed
    for metric in ("loss", "span_accuracy", "greedy_accuracy"):
        assert table[metric].notna().all()
    assert ((table["span_accuracy"] >= 0) & (table["span_accuracy"] <= 1)).all()
    # The baseline row's per-example values are correctness_loss / span_accuracy with reduction="none".
    per_example = table.attrs["per_example"]
    baseline = next(iter(per_example.values()))
    assert [v[0] for v in baseline.values()] == pytest.approx(correctness_loss(model, EXAMPLES, reduction="none"))
    assert [v[1] for v in baseline.values()] == span_accuracy(model, EXAMPLES, reduction="none")
    # keep (P) and remove (I - P) project differently: the losses differ.
    gradient = table[table["source"] == "gradient"]
    assert gradient["loss"].iloc[0] != pytest.approx(gradient["loss"].iloc[1], abs=1e-9)
    # Per cell and metric: gradient minus the random draws' mean, with an interval around it.
    controls = table.attrs["controls"]
    assert len(controls) == 2 * 3
    for c in controls:
        assert c["difference"] == pytest.approx(c["gradient"] - c["random"], abs=1e-9)
        assert c["ci"][0] - 1e-9 <= c["difference"] <= c["ci"][1] + 1e-9 and len(c["random_draws"]) == 3
    # Files: rows, table, controls, a page and a PNG per metric.
    saved = json.loads((out / "ablate.json").read_text())
    assert len(saved["rows"]) == 9 and saved["random_seeds"] == sorted(set(seeds), key=seeds.index)
    assert (out / "ablate.csv").read_text().splitlines()[0].startswith("cell,mode,source,draw,random_seed")
    assert all((out / f"ablate-{m}.png").read_bytes()[:4] == b"\x89PNG"
               for m in ("loss", "span_accuracy", "greedy_accuracy"))
    assert "gradient vs matched random subspace" in (out / "ablate.html").read_text()
    # Resumed: nothing runs again, the recorded seeds are reused; one more draw runs only its rows.
    calls = []
    real = grid.sample
    monkeypatch.setattr(grid, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = spd_lens.ablate(model, EXAMPLES, subspace=sub, ranks=[2], layer_sets=[[3]], random_draws=3,
                            max_new_tokens=2, out=out)
    assert not calls and list(again["random_seed"].dropna()) == list(table["random_seed"].dropna())
    grown = spd_lens.ablate(model, EXAMPLES, subspace=sub, ranks=[2], layer_sets=[[3]], random_draws=4,
                            max_new_tokens=2, out=out)
    assert len(calls) == 2 and len(grown) == 11
    # Another directory's inputs are refused, naming what differs.
    with pytest.raises(SpdLensError, match="max_new_tokens: directory has 2, now 3"):
        spd_lens.ablate(model, EXAMPLES, subspace=sub, ranks=[2], layer_sets=[[3]], max_new_tokens=3, out=out)


def test_ablate_seeds_are_fresh_per_call_unless_given_and_settings_are_checked(setting):
    from spd_lens.ablate_examples import _seeds

    first, second = _seeds(3, None, {}, "examples"), _seeds(3, None, {}, "examples")
    assert first["stream"] != second["stream"] and set(first["seeds"]).isdisjoint(second["seeds"])
    assert _seeds(3, None, {"seed_stream": first["stream"]}, "examples")["seeds"] == first["seeds"]
    assert _seeds(3, [5, 6], {}, "examples")["seeds"] == [5, 6]
    model, sub = setting
    for kwargs, match in (({"random_seeds": [1, 1]}, "random_seeds"), ({"modes": ["drop"]}, "modes"),
                          ({"layer_sets": [[2]]}, "layer_sets"), ({"kind_sets": [["q"]]}, "kind_sets"),
                          ({"ranks": [0]}, "ranks"), ({"random_draws": -1}, "random_draws")):
        with pytest.raises(SpdLensError, match=match):
            spd_lens.ablate(model, EXAMPLES, subspace=sub, max_new_tokens=1, **kwargs)
    with pytest.raises(SpdLensError, match="list of spd_lens.Example"):
        spd_lens.ablate(model, ["What is 2 + 2?"], subspace=sub)


def test_ablate_without_pandas_returns_rows_with_to_csv(setting, tmp_path, monkeypatch):
    model, sub = setting
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("no pandas")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    rows = spd_lens.ablate(model, EXAMPLES, subspace=sub, ranks=[1], layer_sets=[[1]], modes=["remove"],
                           random_draws=1, random_seeds=[7], max_new_tokens=1)
    assert type(rows).__name__ == "Rows" and rows[0]["source"] == "none" and rows["random_seed"] == [None, None, 7]
    rows.to_csv(tmp_path / "t.csv")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 4


def test_ablate_cli_runs_the_grid_on_a_jsonl_of_your_examples(tmp_path, capsys):
    from spd_lens.cli import main as cli

    data = tmp_path / "adds.jsonl"
    data.write_text("".join(json.dumps({"id": e.id, "prompt": e.prompt, "answer": e.reference, "span": e.reference})
                            + "\n" for e in EXAMPLES))
    out = tmp_path / "run"
    assert cli(["ablate", "--examples", str(data), "--model", "tiny", "--split", "all", "--layers", "3",
                "--ranks", "2", "--modes", "remove", "--draws", "2", "--max-new-tokens", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient - random per cell" in printed and "greedy_accuracy" in printed
    rows = json.loads((out / "ablate.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["none", "gradient", "random", "random"]
    assert set(rows[0]["per_example"]) == {e.id for e in EXAMPLES}
    assert cli(["ablate"]) == 2 and "--examples FILE.jsonl" in capsys.readouterr().err
    # The default split (dev) extracts from the file's train examples: too few for extract_n says how to go on.
    assert cli(["ablate", "--examples", str(data), "--model", "tiny", "--ranks", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--extract-n" in capsys.readouterr().err
