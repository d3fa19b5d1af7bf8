"""The run report: `RUN/report.html` and the plain-text table the CLI prints.

The page says what ran (model, task, data and their recorded hashes, methods, seeds, runtime),
one plain sentence per paired comparison (which way, resolved or not, at what interval, in
questions), the per-method table with the training data's quality and cut-off shares, three
example completions per method, and the figures. plotly.js is written once beside the page
(`plotly.min.js`), so the page itself stays small; `plotly="cdn"` links it instead and
`plotly="inline"` embeds it (one self-contained file, about 5 MB).

Example:
    >>> from spd_lens.report import comparison_sentence
    >>> comparison_sentence("spd - psr", {"difference": 1 / 30, "ci": [0.0, 0.1], "n": 30})
    'spd scored 0.033 above psr, not resolved: the 95% interval [+0.000, +0.100] includes no difference (1 question of 30)'
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.evaluate import seeds_differ
from spd_lens.sandbox import describe_isolation
from spd_lens.subspace import CapabilitySubspace

SPREAD_FLAG = "  ! seeds differ more than questions alone explain: more seeds needed"


def format_table(metrics: dict) -> str:
    """Score, 95% CI (seeds, then questions), n, each seed's score; the training data's quality;
    paired differences. `!` marks a result whose seed spread exceeds its interval."""
    rows = [f"{'method':<12} {'score':>7}  {'95% CI':<17} {'n':>5}  per seed"]
    for name, m in metrics["methods"].items():
        seeds = "  ".join(f"{seed}: {s['score']:.3f}" for seed, s in m.get("seeds", {}).items())
        answers = "  answers " + " ".join(f"{a}:{k}" for a, k in m["answers"].items()) if m.get("answers") else ""
        kinds = "  outcomes " + " ".join(f"{k}:{v}" for k, v in m["outcomes"].items()) if m.get("outcomes") else ""
        flag = SPREAD_FLAG if seeds_differ(m) else ""
        rows.append(f"{name:<12} {m['score']:>7.3f}  [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]  {m['n']:>5}  {seeds}{answers}{kinds}{flag}")
    scored = {name: m["loglik"] for name, m in metrics["methods"].items() if m.get("loglik")}
    if scored:
        rows += ["", f"{'log-likelihood':<14} {'as asked':>8}  {'rotated':>7}  {'opt.avg':>7}  choice rates as asked"]
        for name, q in scored.items():
            rates = " ".join(f"{label}:{rate:.2f}" for label, rate in q["choice_rates"].items())
            rows.append(f"{name:<14} {q['accuracy']:>8.3f}  {q['debiased_accuracy']:>7.3f}  "
                        f"{q['option_average_accuracy']:>7.3f}  {rates}")
    trained = {name: m["training_data"] for name, m in metrics["methods"].items() if m.get("training_data")}
    if trained:
        rows += ["", f"{'training data':<12} {'correct':>7}  {'cut off':>7}  {'tokens':>6}  {'n':>5}  correct per seed"]
        for name, q in trained.items():
            seeds = "  ".join(f"{seed}: {s['correct']:.3f}" for seed, s in q.get("seeds", {}).items())
            tokens = f"{q['mean_tokens']:>6.1f}" if q.get("mean_tokens") is not None else f"{'-':>6}"
            rows.append(f"{name:<12} {q['correct']:>7.3f}  {q['cut_off']:>7.3f}  {tokens}  {q['n']:>5}  {seeds}")
    if metrics.get("comparisons"):
        rows += ["", f"{'paired difference':<24} {'mean':>7}  95% CI (bootstrap over seeds, then the shared questions)"]
        for name, c in metrics["comparisons"].items():
            flag = SPREAD_FLAG if seeds_differ(c) else ""
            rows.append(f"{name:<24} {c['difference']:>+7.3f}  [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]{flag}")
    if metrics.get("sandbox"):
        rows += ["", describe_isolation(metrics["sandbox"])]
    if metrics.get("pending"):
        rows += ["", f"not finished: {', '.join(metrics['pending'])}"]
    warnings = cut_off_warnings(metrics)
    if warnings:
        rows += [""] + [f"! {w}" for w in warnings]
    return "\n".join(rows)


# A share of completions cut off at the token budget above this makes scores hard to read:
# a cut-off answer is scored as written, so the budget, not the model, may decide it.
CUT_OFF_WARNING = 0.10
PLOTLY_MODES = ("file", "cdn", "inline")
PLOTLY_FILE = "plotly.min.js"


def _eval_cut_off(m: dict) -> float | None:
    """The share of a method's evaluation completions cut off at the token budget, where counted."""
    if isinstance(m.get("cut_off"), (int, float)):
        return float(m["cut_off"])
    reasons = m.get("finish_reasons") or {}
    total = sum(reasons.values())
    return reasons.get("length", 0) / total if total else None


def cut_off_warnings(metrics: dict, threshold: float = CUT_OFF_WARNING) -> list[str]:
    """One line per method whose evaluation or training data has more than `threshold` of its
    completions cut off at the token budget (`max_new_tokens`).

        >>> cut_off_warnings({"methods": {"spd": {"finish_reasons": {"length": 3, "stop": 7}}}})
        ['spd: 30% of the evaluation completions cut off at the token budget (above 10%): raise max_new_tokens or read its scores with care']
    """
    lines = []
    for name, m in metrics.get("methods", {}).items():
        shares = [f"{share:.0%} of the {what} completions" for what, share in
                  (("evaluation", _eval_cut_off(m)), ("training data", (m.get("training_data") or {}).get("cut_off")))
                  if share is not None and share > threshold]
        if shares:
            lines.append(f"{name}: {' and '.join(shares)} cut off at the token budget (above {threshold:.0%}): "
                         "raise max_new_tokens or read its scores with care")
    return lines


def _seed_count(metrics: dict, names: list[str]) -> int:
    return max([len(metrics.get("methods", {}).get(n, {}).get("seeds") or {}) for n in names] + [1])


def comparison_sentence(name: str, c: dict, seeds: int = 1) -> str:
    """`spd - psr` and its paired difference as one sentence: which way, resolved or not (the
    95% interval excludes zero), the interval, and the difference in questions of the shared set.

    An interval that touches zero is not resolved: "+0.033 [+0.000, +0.100]" on 30 questions is
    one question, and reads as such."""
    first, _, second = name.partition(" - ")
    d, (low, high), n = c["difference"], c["ci"], c.get("n")
    eps = 1e-9  # bootstrap quantiles of shares land on exact fractions; rounding must not resolve 0
    if abs(d) < eps:
        text = f"{first} scored the same as {second}"
    else:
        text = f"{first} scored {abs(d):.3f} {'above' if d > 0 else 'below'} {second}"
    interval = f"[{low:+.3f}, {high:+.3f}]"
    if low > eps:
        text += f", resolved: the 95% interval {interval} lies above zero"
    elif high < -eps:
        text += f", resolved: the 95% interval {interval} lies below zero"
    else:
        text += f", not resolved: the 95% interval {interval} includes no difference"
    if n:
        net = abs(d) * n
        if seeds > 1:
            text += f" ({net:.1f} questions of {n} on average over {seeds} seeds)"
        else:
            questions = round(net)
            text += f" ({questions} question{'' if questions == 1 else 's'} of {n})"
    if seeds_differ(c):
        text += "; the seeds differ more than the questions explain: more seeds are needed before reading it"
    return text


def comparison_sentences(metrics: dict) -> list[str]:
    """`comparison_sentence` for each paired comparison the metrics hold, in their order."""
    return [comparison_sentence(name, c, _seed_count(metrics, name.split(" - ")))
            for name, c in (metrics.get("comparisons") or {}).items()]


# --- what ran ----------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _first_record(path: Path) -> dict:
    try:
        with open(path) as handle:
            return json.loads(handle.readline() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _hashes(value, where: str, found: dict[str, str]) -> None:
    """Every recorded hash or weights id in `value` (keys ending in sha256 / _hash, or naming
    weights), the first of each name kept, with where it was read."""
    if isinstance(value, dict):
        for key, inner in value.items():
            hashed = key.endswith(("sha256", "_hash")) or "weights" in key
            if hashed and isinstance(inner, (str, int)) and key not in found:
                found[key] = f"{inner} ({where})"
            else:
                _hashes(inner, where, found)
    elif isinstance(value, list):
        for inner in value[:50]:
            _hashes(inner, where, found)


def recorded_hashes(run_dir: Path, metrics: dict, config: dict) -> dict[str, str]:
    """The content hashes and weights ids the run's files record: metrics.json, config.json,
    the evaluation and training records' settings, the subspaces' and adapters' metadata
    (`RUN/inputs.json`, what the stages read, is shown on its own)."""
    found: dict[str, str] = {}
    _hashes({k: v for k, v in metrics.items() if k != "methods"}, "metrics.json", found)
    _hashes(config, "config.json", found)
    for path in sorted((run_dir / "eval").glob("*.jsonl"))[:1]:
        _hashes(_first_record(path).get("settings", {}), f"eval/{path.name}", found)
    for path in sorted((run_dir / "subspaces").glob("*/subspace.json"))[:1]:
        _hashes(_read_json(path), f"subspaces/{path.parent.name}", found)
    for path in sorted((run_dir / "adapters").glob("*/train.json"))[:1]:
        _hashes(_read_json(path).get("settings", {}), f"adapters/{path.parent.name}", found)
    return found


def _what_ran(run_dir: Path, metrics: dict, config: dict) -> list[tuple[str, str | list[str]]]:
    task = config.get("task") or {}
    data = (task.get("data") or "the task's built-in generator or packaged data") if config else \
        "not recorded (no config.json beside metrics.json)"
    sizes = ", ".join(f"{k.removesuffix('_n')} {task[k]}" for k in ("train_n", "eval_n") if task.get(k) is not None)
    subspace = metrics.get("subspace_task")
    task_line = f"{metrics.get('task')}" + (f" ({sizes}; evaluated on the {task.get('eval_split', 'test')} split)"
                                            if sizes else "")
    if subspace and subspace != metrics.get("task"):
        task_line += f"; subspace from {subspace}"
    seeds = config.get("seeds") or sorted({s for m in metrics["methods"].values() for s in (m.get("seeds") or {})})
    missing = sorted({s for m in metrics["methods"].values() for s in m.get("missing_seeds", [])})
    inputs = _read_json(run_dir / "inputs.json")  # what the stages read: weights id, data hashes, runtimes
    runtime = metrics.get("runtime") or inputs.get("runtime") or {}
    runtime_line = (", ".join(f"{k} {v}" for k, v in runtime.items()) if runtime
                    else "not recorded (metrics written by an older version)")
    evaluated = inputs.get("evaluation_runtime")
    if evaluated and evaluated != runtime:
        runtime_line += "; evaluated in " + ", ".join(f"{k} {v}" for k, v in evaluated.items())
    stages = metrics.get("stage_seconds") or {}
    if stages:
        runtime_line += f"; {sum(stages.values()) / 60:.1f} min of stage time (" + ", ".join(
            f"{k} {v:.0f} s" for k, v in stages.items()) + ")"
    # [eval] cut_off: how an answer cut off at the token budget is scored; the default ("score")
    # is left out of config.json
    evaluation = {**config["eval"], "cut_off": config["eval"].get("cut_off", "score")} if config.get("eval") else {}
    hashes = recorded_hashes(run_dir, metrics, config)
    weights = ([f"weights {inputs['weights']} (inputs.json)"] if inputs.get("weights")
               else [f"{k} {v}" for k, v in hashes.items() if "weights" in k])
    hashed = inputs.get("data") or {}
    if hashed:  # content hashes of the examples each stage read
        data = f"{data}; examples sha256: " + "; ".join(
            f"{stage} {value}" if not isinstance(value, dict)
            else f"{stage} " + ", ".join(f"seed {seed} {h}" for seed, h in value.items())
            for stage, value in hashed.items())
    rows = [("model", f"{metrics.get('model')}; " + ("; ".join(weights) if weights else "weights id not recorded by this run")),
            ("task", task_line), ("data", str(data)),
            ("evaluation", ", ".join(f"{k} {v}" for k, v in evaluation.items()
                                     if k in ("temperature", "max_new_tokens", "cut_off") and v is not None)
             or "settings not recorded (no config.json)"),
            ("methods", ", ".join(metrics["methods"])),
            ("seeds", ", ".join(map(str, seeds)) + (f" (missing: {', '.join(map(str, missing))})" if missing else "")),
            ("runtime", runtime_line)]
    others = [f"{k} {v}" for k, v in hashes.items() if "weights" not in k]
    rows.append(("recorded hashes", others if others else "none recorded (metrics only)"))
    rows.append(("written by", f"spd_lens {metrics.get('spd_lens_version', '?')}, finished {metrics.get('finished', '?')}"))
    if metrics.get("pending"):
        rows.append(("not finished", ", ".join(metrics["pending"])))
    if metrics.get("sandbox"):
        rows.append(("code sandbox", describe_isolation(metrics["sandbox"]).removeprefix("code sandbox: ")))
    return rows


# --- examples ------------------------------------------------------------------------------------

def _evaluation_files(run_dir: Path, method: str) -> list[Path]:
    directory = run_dir / "eval"
    return sorted(directory.glob(f"{method}.json")) + sorted(directory.glob(f"{method}-seed*.json"))


def example_completions(run_dir: str | Path, method: str) -> list[dict]:
    """Up to three of `method`'s evaluation completions from `RUN/eval/`: one scored right, one
    scored wrong that ended on its own, one cut off at the token budget (where there is any).
    Each: kind, prompt_id, prompt (from the matching .jsonl, where kept), completion, passed,
    detail, finish_reason, file."""
    run_dir = Path(run_dir)
    for path in _evaluation_files(run_dir, method):
        results = _read_json(path).get("results")
        if not isinstance(results, list) or not results:
            continue
        prompts = {}
        records = path.with_suffix(".jsonl")
        if records.is_file():
            for line in records.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a stopped call
                users = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
                if users:
                    prompts.setdefault(record.get("prompt_id"), users[-1])
        picks = {"right": lambda r: r.get("passed"),
                 "wrong": lambda r: not r.get("passed") and r.get("finish_reason") != "length",
                 "cut off": lambda r: r.get("finish_reason") == "length"}
        chosen, used = [], set()
        for kind, wanted in picks.items():
            for i, r in enumerate(results):
                if i not in used and wanted(r):
                    used.add(i)
                    chosen.append({"kind": kind, "prompt_id": r.get("prompt_id"), "prompt": prompts.get(r.get("prompt_id")),
                                   "completion": r.get("completion", ""), "passed": bool(r.get("passed")),
                                   "detail": r.get("detail", ""), "finish_reason": r.get("finish_reason"),
                                   "file": f"eval/{path.name}"})
                    break
        return chosen
    return []


# --- the page ----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl.ran { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1rem; }
dl.ran dt { font-weight: 600; } dl.ran dd { margin: 0; overflow-wrap: anywhere; }
.warning { background: #fff4e5; border: 1px solid #f0a030; padding: 0.5rem 0.8rem; margin: 0.8rem 0; }
.resolved { color: #1b6e20; } .unresolved { color: #555; }
.cut { background: #fff4e5; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f7f7f7; padding: 0.4rem; margin: 0.2rem 0;
      max-height: 14rem; overflow: auto; font-size: 0.85rem; }
.example { border: 1px solid #ddd; padding: 0.4rem 0.7rem; margin: 0.5rem 0; }
.figure { width: 100%; margin: 1rem 0; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _interval(ci, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _share(value) -> str:
    return "" if value is None else f"{value:.0%}"


def _method_table(metrics: dict) -> str:
    methods = metrics["methods"]
    trained = any(m.get("training_data") for m in methods.values())
    kinds = any(m.get("outcomes") or m.get("answers") for m in methods.values())
    counted = any(_eval_cut_off(m) is not None for m in methods.values())  # older metrics lack finish reasons
    header = ["method", "score", "95% interval", "n", "each seed"] + (["cut off (eval)"] if counted else [])
    header += ["training data correct", "training data cut off", "mean tokens"] if trained else []
    header += ["kinds of result"] if kinds else []
    rows = []
    for name, m in methods.items():
        seeds = ", ".join(f"{seed}: {s['score']:.3f}" for seed, s in (m.get("seeds") or {}).items())
        if m.get("missing_seeds"):
            seeds += f" (missing {', '.join(map(str, m['missing_seeds']))})"
        flag = " !" if seeds_differ(m) else ""
        cut = _eval_cut_off(m)
        cells = [f"<th>{_e(name)}</th>", f"<td class='num'>{m['score']:.3f}{flag}</td>",
                 f"<td class='num'>{_interval(m['ci'])}</td>", f"<td class='num'>{m['n']}</td>",
                 f"<td>{_e(seeds)}</td>"]
        if counted:
            cells.append(f"<td class='num{' cut' if cut is not None and cut > CUT_OFF_WARNING else ''}'>{_share(cut)}</td>")
        if trained:
            q = m.get("training_data") or {}
            hot = q.get("cut_off") is not None and q["cut_off"] > CUT_OFF_WARNING
            tokens = f"{q['mean_tokens']:.1f}" if q.get("mean_tokens") is not None else ""
            cells += [f"<td class='num'>{_share(q.get('correct'))}</td>",
                      f"<td class='num{' cut' if hot else ''}'>{_share(q.get('cut_off'))}</td>",
                      f"<td class='num'>{tokens}</td>"]
        if kinds:
            counts = m.get("outcomes") or m.get("answers") or {}
            cells.append(f"<td>{_e(', '.join(f'{k} {v}' for k, v in counts.items()))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("<p>Score: mean over seeds; interval: 95%, bootstrap over seeds, then questions. "
            "! = the seeds differ more than the questions explain. Cut off: share of completions that hit "
            "the token budget (highlighted above 10%).</p>")
    return ("<table id='methods'><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>" + note)


def _comparison_table(metrics: dict) -> str:
    rows = []
    for name, c in (metrics.get("comparisons") or {}).items():
        low, high = c["ci"]
        verdict = "resolved" if low > 1e-9 or high < -1e-9 else "not resolved"
        rows.append(f"<tr><th>{_e(name)}</th><td class='num'>{c['difference']:+.3f}</td>"
                    f"<td class='num'>{_interval(c['ci'], signed=True)}</td><td class='num'>{c.get('n', '')}</td>"
                    f"<td>{verdict}{'; seeds differ' if seeds_differ(c) else ''}</td></tr>")
    return ("<table id='comparisons'><thead><tr><th>paired difference</th><th>mean</th><th>95% interval</th>"
            "<th>shared questions</th><th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _loglik_table(metrics: dict) -> str:
    scored = {name: m["loglik"] for name, m in metrics["methods"].items() if m.get("loglik")}
    if not scored:
        return ""
    rows = "".join(f"<tr><th>{_e(name)}</th><td class='num'>{q['accuracy']:.3f}</td>"
                   f"<td class='num'>{q['debiased_accuracy']:.3f}</td><td class='num'>{q['option_average_accuracy']:.3f}</td>"
                   f"<td>{_e(' '.join(f'{k}:{v:.2f}' for k, v in q['choice_rates'].items()))}</td></tr>"
                   for name, q in scored.items())
    return ("<h3>Option log-likelihood</h3><table id='loglik'><thead><tr><th>method</th><th>as asked</th>"
            "<th>rotated</th><th>option average</th><th>choice rates as asked</th></tr></thead><tbody>"
            + rows + "</tbody></table>")


def _visible(text: str) -> str:
    """A completion as shown: one of only whitespace is spelled out, else it reads as nothing."""
    return text if text.strip() else f"(only whitespace: {text!r})" if text else "(empty)"


def _examples_section(run_dir: Path, metrics: dict) -> str:
    if not any((run_dir / "eval").glob("*.json")):
        return "<p>This directory keeps no evaluation records (RUN/eval/): only its metrics.</p>"
    parts = []
    for name in metrics["methods"]:
        examples = example_completions(run_dir, name)
        if not examples:
            parts.append(f"<h3>{_e(name)}</h3><p>No evaluation records of {_e(name)} kept in RUN/eval/.</p>")
            continue
        parts.append(f"<h3>{_e(name)}</h3>")
        if not any(x["kind"] == "cut off" for x in examples):
            parts.append("<p>No completion of this evaluation was cut off.</p>")
        for x in examples:
            verdict = "scored right" if x["passed"] else "scored wrong"
            detail = f" ({_e(x['detail'])})" if x.get("detail") else ""
            prompt = f"<div>prompt</div><pre>{_e(x['prompt'][-1500:])}</pre>" if x.get("prompt") else ""
            parts.append(f"<div class='example' data-kind='{_e(x['kind'])}'><b>{_e(x['kind'])}</b>: {_e(x['prompt_id'])}, "
                         f"{verdict}{detail}, finish {_e(x.get('finish_reason') or '?')} <small>{_e(x['file'])}</small>"
                         f"{prompt}<div>completion</div><pre>{_e(_visible(x['completion'][:3000]))}</pre></div>")
    return "".join(parts)


def _figures(run_dir: Path, metrics: dict) -> list:
    from spd_lens.viz import (comparison_figure, method_scores_figure, outcome_figure, spectrum_figure,
                              training_data_figure)

    figures = [method_scores_figure(metrics)]
    if metrics.get("comparisons"):
        figures.append(comparison_figure(metrics))
    for directory in sorted((run_dir / "subspaces").glob("gradient-seed*")):
        try:
            subspace = CapabilitySubspace.load(directory)
        except SpdLensError:
            continue
        figures += [spectrum_figure(subspace, "k"), spectrum_figure(subspace, "v")]
        break
    # after the spectra, so that the figures' file numbers stay those of earlier reports
    figures += [outcome_figure(metrics, key) for key in ("outcomes", "answers")
                if any(m.get(key) for m in metrics["methods"].values())]
    if any(m.get("training_data") for m in metrics["methods"].values()):
        figures.append(training_data_figure(metrics))
    return figures


def _plotly_script(run_dir: Path, mode: str) -> str:
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    from spd_lens.artifacts import atomic_write

    if mode == "cdn":
        return f"<script src='https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js' charset='utf-8'></script>"
    if mode == "inline":
        return f"<script type='text/javascript'>{get_plotlyjs()}</script>"
    code = get_plotlyjs()
    path = run_dir / PLOTLY_FILE
    # Written once per run directory; rewritten only when another plotly version made it.
    if not path.is_file() or path.stat().st_size != len(code.encode()) or path.read_text(encoding="utf-8") != code:
        atomic_write(path, lambda tmp: Path(tmp).write_text(code, encoding="utf-8"))
    return f"<script src='{PLOTLY_FILE}' charset='utf-8'></script>"


def render_run_report(run_dir: str | Path, metrics: dict, *, plotly: str = "file", figures: list | None = None) -> str:
    """The report page's HTML for the run in `run_dir` (see `write_run_report`)."""
    if plotly not in PLOTLY_MODES:
        raise SpdLensError(f"plotly={plotly!r}: use one of {', '.join(PLOTLY_MODES)} (file: one plotly.min.js "
                           "beside the report; cdn: linked from cdn.plot.ly; inline: embedded in the page)")
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    figures = _figures(run_dir, metrics) if figures is None else figures
    title = f"spd_lens run {metrics.get('run')}"
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{_e(title)}</title><style>{_CSS}</style>", _plotly_script(run_dir, plotly), "</head><body><main>",
             f"<h1>{_e(title)}</h1>", "<h2>What ran</h2><dl class='ran'>"]
    for key, value in _what_ran(run_dir, metrics, config):
        if isinstance(value, list):
            value = "<ul>" + "".join(f"<li>{_e(v)}</li>" for v in value) + "</ul>"
        else:
            value = _e(value)
        parts.append(f"<dt>{_e(key)}</dt><dd>{value}</dd>")
    parts.append("</dl>")
    sentences = comparison_sentences(metrics)
    if sentences:
        parts.append("<h2>Verdicts</h2><ul id='verdicts'>")
        for sentence in sentences:
            css = "unresolved" if "not resolved" in sentence else "resolved"
            parts.append(f"<li class='{css}'>{_e(sentence)}.</li>")
        parts.append("</ul>")
    parts.append("<h2>Per method</h2>")
    warnings = cut_off_warnings(metrics)
    if warnings:
        parts.append("<div class='warning' id='cut-off-warning'><b>Cut off at the token budget:</b><ul>"
                     + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>")
    parts.append(_method_table(metrics))
    if metrics.get("comparisons"):
        parts.append("<h3>Paired differences</h3>" + _comparison_table(metrics))
    parts.append(_loglik_table(metrics))
    parts.append("<h2>Example completions</h2><p>Per method, from its first evaluation file: one scored right, one "
                 "scored wrong, one cut off at the token budget (where there is one of each).</p>")
    parts.append(_examples_section(run_dir, metrics))
    parts.append("<h2>Figures</h2>")
    for i, figure in enumerate(figures):
        height = figure.layout.height or 440
        parts.append("<div class='figure'>" + figure.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"figure-{i + 1}", default_width="100%",
            default_height=f"{height}px", config={"responsive": True, "displaylogo": False}) + "</div>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_run_report(run_dir: str | Path, *, plotly: str = "file", images: bool = False,
                     log: Callable[[str], None] | None = None) -> Path:
    """`RUN/report.html` from `RUN/metrics.json` and the files beside it: what ran, a verdict
    sentence per paired comparison, the per-method table (with the training data's quality and
    cut-off shares), example completions and the figures (scores, paired differences, the
    gradient subspaces' spectra, kinds of result or answers chosen, training-data quality).

    `plotly`: "file" (default: `RUN/plotly.min.js`, written once, beside the page), "cdn" or
    "inline". `images`: also PNG/SVG copies of the figures (`RUN/report-N.png|svg`; off by
    default: a run rewrites its report after every evaluation, and drawing them takes seconds;
    `spd-lens report RUN` draws them); what was written (or why not) goes to `log`, never into
    the page."""
    from spd_lens.artifacts import atomic_write
    from spd_lens.viz import export_images

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise SpdLensError(f"{run_dir} has no metrics.json: run `spd-lens run CONFIG --out {run_dir}` first")
    metrics = json.loads(metrics_path.read_text())
    figures = _figures(run_dir, metrics)
    page = render_run_report(run_dir, metrics, plotly=plotly, figures=figures)
    path = run_dir / "report.html"
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    if images:
        exported = export_images(figures, run_dir, path.stem)
        if log is not None:
            log(exported)
    return path
