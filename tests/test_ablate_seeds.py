"""Random controls in ablations: seeds from a split-aware stream, recorded per row, and read back
from tables written before seeds were recorded (seed = draw)."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from spd_lens import SpdLensError
from spd_lens.subspace import LEGACY_SEEDS, control_seed

ROOT = Path(__file__).resolve().parents[1]
RAW = {"name": "seeds", "seeds": [0], "model": {"name": "tiny"}, "task": {"eval_n": 3, "eval_split": "dev"},
       "subspace": {"n": 2, "layers": [1, 3]}, "eval": {"max_new_tokens": 2},
       "ablate": {"ranks": [4], "layer_sets": [[1]], "kind_sets": [["k"]], "random_draws": 2, "loss_n": 2}}


def test_control_seeds_are_disjoint_across_splits_and_streams_and_never_legacy():
    seeds = {(split, stream, d): control_seed(split, d, stream)
             for split in ("train", "dev", "test", "ood") for stream in (0, 1, "abc") for d in range(200)}
    assert len(set(seeds.values())) == len(seeds)  # no two (split, stream, draw) share a seed
    assert min(seeds.values()) >= LEGACY_SEEDS == 1000
    assert control_seed("test", 3) == seeds[("test", 0, 3)]  # deterministic: a resume draws the same
    with pytest.raises(SpdLensError, match="draw must be a whole number"):
        control_seed("dev", -1)


def test_grid_seeds_random_draws_by_split_or_as_given():
    from spd_lens.ablate import grid
    from spd_lens.config import config_from_dict

    def draws(raw):
        return [(r["draw"], r["random_seed"]) for r in grid(config_from_dict(raw), [1, 3]) if r["subspace"] == "random"]

    dev = draws(RAW)
    test = draws({**RAW, "task": {**RAW["task"], "eval_split": "test"}})
    assert dev == [(0, control_seed("dev", 0)), (1, control_seed("dev", 1))]
    assert {s for _, s in dev}.isdisjoint(s for _, s in test)
    assert draws({**RAW, "ablate": {**RAW["ablate"], "random_seeds": [7, 9]}}) == [(0, 7), (1, 9)]
    given = {**RAW, "ablate": {**RAW["ablate"], "random_draws": 0, "random_seeds": [7, 9, 11]}}
    assert len(draws(given)) == 3  # the seeds give the number of draws
    for seeds, match in (([7, 7], "distinct"), ([7, 8, 9], "gives 3 seed")):
        with pytest.raises(SpdLensError, match=match):
            draws({**RAW, "ablate": {**RAW["ablate"], "random_seeds": seeds}})


def test_seeded_directory_runs_only_new_random_rows_and_legacy_rows_read_as_seed_equal_draw(tmp_path, monkeypatch):
    import spd_lens.ablate as ablate
    from spd_lens.config import config_from_dict

    # A table as an earlier version wrote it: random draws seeded by the draw index, no random_seed.
    legacy = config_from_dict({**RAW, "ablate": {**RAW["ablate"], "random_seeds": [0, 1]}})
    rows = ablate.run_ablation(legacy, tmp_path / "old")
    assert [r["random_seed"] for r in rows if r["subspace"] == "random"] == [0, 1]
    table = json.loads((tmp_path / "old" / "ablation.json").read_text())
    old_rows = [{k: v for k, v in r.items() if k != "random_seed"} for r in table["rows"]]
    controls = ablate.controls(old_rows)
    assert controls[0]["random_seeds"] == [0, 1]  # legacy rows: seed = draw
    # Another directory seeded with the old table alone (ablation.json copied, nothing else).
    for name in ("new", "same"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation.json").write_text(json.dumps({**table, "rows": old_rows}))
        shutil.copytree(tmp_path / "old" / "subspaces", tmp_path / name / "subspaces")
    calls = []
    real_sample = ablate.sample
    monkeypatch.setattr(ablate, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    fresh = ablate.run_ablation(config_from_dict(RAW), tmp_path / "new")
    assert len(calls) == 2  # the baseline and gradient rows are reused; the two new-seed draws run
    random = [r for r in fresh if r["subspace"] == "random"]
    assert [r["random_seed"] for r in random] == [control_seed("dev", 0), control_seed("dev", 1)]
    # Other seeds, other subspaces: the new draws' losses are not the legacy draws'.
    assert {round(r["loss"], 9) for r in random}.isdisjoint(
        round(r["loss"], 9) for r in rows if r["subspace"] == "random")
    written = [json.loads(line) for line in (tmp_path / "new" / "ablation.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("copied")) for r in written) == len(old_rows)  # their seconds are not this run's
    assert [r["random_seed"] for r in csv.DictReader(open(tmp_path / "new" / "ablation.csv"))][-2:] == [
        str(control_seed("dev", 0)), str(control_seed("dev", 1))]
    # A resume reuses the recorded seeds: nothing runs again.
    assert [r["random_seed"] for r in ablate.run_ablation(config_from_dict(RAW), tmp_path / "new")
            if r["subspace"] == "random"] == [r["random_seed"] for r in random]
    assert len(calls) == 2
    # The legacy seeds given explicitly match the legacy rows: nothing runs.
    again = ablate.run_ablation(legacy, tmp_path / "same")
    assert len(calls) == 2 and [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_committed_study_tables_load_and_summarise(tmp_path):
    from spd_lens.ablate import _key, _random_seed, grid, refresh_controls
    from spd_lens.config import load_config

    study = ROOT / "experiments" / "results" / "study"
    tables = sorted(study.glob("*/ablation.json"))
    assert len(tables) >= 5
    recorded = {"gate-test-clean", "gemma-gate", "gemma-gate-test"}  # gates run with the split-aware seeds
    assert recorded <= {path.parent.name for path in tables}
    for path in tables:
        table = json.loads(path.read_text())
        for row in table["rows"]:
            drawn = row.get("subspace") == "random"
            # Gates run since seeds are recorded hold their split's own stream; legacy rows seed = draw.
            fresh = path.parent.name in recorded
            assert (row.get("random_seed") is not None) == (fresh and drawn), path
            expected = (control_seed(table["split"], row["draw"]) if fresh else row["draw"]) if drawn else None
            assert _random_seed(row) == expected, path
    # gate-test's rows seed a new test gate: only its random rows are new (fresh, test-only seeds).
    shutil.copy(study / "gate-test" / "ablation.json", tmp_path / "ablation.json")
    assert refresh_controls(tmp_path)[0]["random_seeds"] == [0, 1, 2, 3]
    config = load_config(ROOT / "experiments" / "study" / "gate-test.toml")
    done = {_key(r, 0) for r in json.loads((tmp_path / "ablation.json").read_text())["rows"]}
    todo = [p for p in grid(config, [15, 29]) if _key(p, 0) not in done]
    assert len(todo) == 4 * 4 and all(p["subspace"] == "random" for p in todo)
    assert {p["random_seed"] for p in todo} == {control_seed("test", d) for d in range(4)}


def test_config_grid_runs_keep_and_remove_cells_with_their_own_controls(tmp_path, monkeypatch):
    """`[ablate] modes`: each cell runs with P (keep) and I - P (remove), each beside its own random
    draws; a directory made before modes existed resumes (its rows are the keep cells)."""
    import spd_lens.ablate as ablate
    from spd_lens.config import config_from_dict

    built = []
    real_build = ablate.Projection.build
    monkeypatch.setattr(ablate.Projection, "build", lambda *a, **k: built.append(k["complement"]) or real_build(*a, **k))
    keep = ablate.run_ablation(config_from_dict(RAW), tmp_path / "run")
    assert built == [False] * 3
    both = {**RAW, "ablate": {**RAW["ablate"], "modes": ["keep", "remove"]}}
    rows = ablate.run_ablation(config_from_dict(both), tmp_path / "run")
    assert built == [False] * 3 + [True] * 3  # only the remove cell and its draws ran
    by = {(r.get("mode"), r["subspace"], r["draw"]): r for r in rows}
    assert [r["loss"] for r in rows[:4]] == [r["loss"] for r in keep]
    # P and I - P of the same rank-4 subspace are different models.
    assert by[("remove", "gradient", None)]["loss"] != by[("keep", "gradient", None)]["loss"]
    assert by[("remove", "random", 0)]["random_seed"] == by[("keep", "random", 0)]["random_seed"]
    assert sorted(c["mode"] for c in ablate.controls(rows)) == ["keep", "remove"]
    with pytest.raises(SpdLensError, match=r"ablate.modes \['drop'\].*remove"):
        ablate.grid(config_from_dict({**RAW, "ablate": {**RAW["ablate"], "modes": ["drop"]}}), [1, 3])


def test_copied_table_rows_are_reused_only_from_the_same_subspaces_and_evaluation(tmp_path, monkeypatch, capsys):
    """A table copied in from a run with another subspace (here: other calibration examples) has
    its gradient rows run again; one from another split is refused; a legacy table says so."""
    import spd_lens.ablate as ablate
    from spd_lens.config import config_from_dict

    first = ablate.run_ablation(config_from_dict(RAW), tmp_path / "a")
    table = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert set(table["subspace_ids"]) == {"0"}
    calls = []
    real_sample = ablate.sample
    monkeypatch.setattr(ablate, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    other = {**RAW, "subspace": {**RAW["subspace"], "n": 3}}  # another extraction, same cells
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ablation.json", tmp_path / "b" / "ablation.json")
    rows = ablate.run_ablation(config_from_dict(other), tmp_path / "b")
    assert len(calls) == 1  # the gradient row alone; the baseline and fixed-rank draws are reused
    gradient = [r for r in rows if r["subspace"] == "gradient"]
    assert gradient[0]["loss"] != next(r for r in first if r["subspace"] == "gradient")["loss"]
    assert "made from other subspaces" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ablation.json").write_text(json.dumps({**table, "split": "test"}))
    with pytest.raises(SpdLensError, match="split 'test'.*'dev'.*remove that file"):
        ablate.run_ablation(config_from_dict(RAW), tmp_path / "c")
    (tmp_path / "d").mkdir()
    legacy = {k: v for k, v in table.items() if k != "subspace_ids"}
    (tmp_path / "d" / "ablation.json").write_text(json.dumps(legacy))
    ablate.run_ablation(config_from_dict(RAW), tmp_path / "d")
    assert len(calls) == 1 and "do not record their subspaces" in capsys.readouterr().err
