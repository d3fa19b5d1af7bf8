"""Every benchmark script in its smoke mode (`--smoke`: the tiny random model, tiny sizes), one
after another in this process, so torch and transformers are imported once. A script passes when
it runs to its end and its last line is a JSON object. The test suite runs this
(tests/test_benchmarks.py); a script that no longer runs fails it.

    python benchmarks/smoke.py                    # all of them
    python benchmarks/smoke.py bench_train ...    # some
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Each script's smoke command line. gpu_check.py needs a CUDA GPU (its refusal is tested in
# tests/test_runtime.py); bench_engine.py needs vLLM's own environment.
SMOKE = {
    "bench_attribution": ["--smoke"],
    "bench_batching": ["--smoke"],
    "bench_bridge_attention": ["--smoke"],
    "bench_dtype": ["--smoke"],
    "bench_eval": ["--smoke", "--skip-code"],
    "bench_extract": ["--smoke"],
    "bench_memory": ["--smoke"],
    "bench_parallel": ["--smoke"],
    "bench_prefix": ["--smoke"],
    "bench_sampling": ["--smoke"],
    "bench_threads": ["--smoke"],
    "bench_train": ["--smoke"],
    "decode_profile": ["--smoke"],
    "decode_waste": [str(ROOT / "experiments" / "results" / "study" / "math-easy"), "--smoke"],
    "plan_rates": [str(ROOT / "experiments" / "results"), "--smoke"],
    "readme_memory": ["--smoke"],
}
# Scripts that start processes of their own (each imports torch again: most of their smoke time).
SPAWNING = {"bench_batching", "bench_bridge_attention", "bench_extract", "bench_memory", "bench_parallel", "bench_threads",
            "readme_memory"}
NOT_SMOKED = {"gpu_check": "needs a CUDA GPU", "bench_engine": "needs vLLM in its own environment",
              "results_file": "a helper", "tables": "the docs table generator (tested on its own)", "smoke": "this runner"}


def run_one(name: str, argv: list[str]) -> tuple[bool, float, str]:
    out = io.StringIO()
    start = time.perf_counter()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(HERE / f"{name}.py"), *argv]
    try:
        with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(out):
            os.chdir(ROOT)
            os.environ["TMPDIR"] = work  # scripts' temporary files go away with the run
            runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
        last = out.getvalue().strip().splitlines()[-1]
        if not isinstance(json.loads(last), dict):
            raise ValueError(f"the last line is not a JSON object: {last[:200]}")
        return True, time.perf_counter() - start, last
    except SystemExit as stop:
        if stop.code in (0, None):
            last = out.getvalue().strip().splitlines()[-1:] or [""]
            try:
                json.loads(last[0])
                return True, time.perf_counter() - start, last[0]
            except ValueError:
                pass
        return False, time.perf_counter() - start, f"exit {stop.code}: {out.getvalue()[-1500:]}"
    except Exception:
        return False, time.perf_counter() - start, out.getvalue()[-1500:] + traceback.format_exc()[-3000:]
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        tempfile.tempdir = None


def main() -> int:
    names = sys.argv[1:] or list(SMOKE)
    failed = []
    for name in names:
        ok, seconds, what = run_one(name, SMOKE[name])
        print(f"{'ok  ' if ok else 'FAIL'} {name:<24} {seconds:6.1f} s  {what[:160] if ok else ''}", flush=True)
        if not ok:
            failed.append(name)
            print(what, file=sys.stderr)
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
