"""`head_attribution` on a booted bridge with no hooks on: through its plain HF model (`route="auto"`,
what it does by default) against through the bridge's hook points (`route="bridge"`, the reference).

    python benchmarks/bench_attribution.py [--task arithmetic --n 8 --pairs 2]

Every layer of the model (30 for the default), both modes (keep and remove), `score_top=0` (the
gradient pass and the forward passes only), the same examples on both routes: the rows must agree
(delta losses within 1e-4) before any timing counts. Interleaved A B, B A, ... in one process; the
median of the per-pair ratios (bridge seconds / plain seconds), with an A/A control series (plain
against plain) that must read about 1.00. The last line is JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--n", type=int, default=8, help="calibration examples")
    parser.add_argument("--pairs", type=int, default=2)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, n=2, pairs=1)

    import torch

    import spd_lens
    from spd_lens.attribution import head_attribution, model_shape

    model = spd_lens.load_model(args.model)
    task = spd_lens.get_task(args.task)
    encoded = [task.locate(model.tokenizer, e) for e in task.examples("train", n=args.n, seed=0)]
    layers = list(range(model_shape(model)["n_layers"]))
    subspace = spd_lens.extract_subspace(model, encoded, layers=layers)  # every layer, once, for both routes
    print(f"{args.task}: {args.n} examples, {len(subspace.layers)} layers, torch threads {torch.get_num_threads()}")

    def run(route: str) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        rows = head_attribution(model, encoded, subspace=subspace, score_top=0, route=route)
        return time.perf_counter() - start, rows

    first_bridge, reference = run("bridge")  # warm-up, and the rows the plain route must reproduce
    first_plain, plain = run("auto")
    keys = [k for k in reference[0] if k.startswith("delta_loss") or k.startswith("layer_delta_loss")]
    worst = max(abs(a[k] - b[k]) for a, b in zip(reference, plain) for k in keys)
    if len(reference) != len(plain) or worst > 1e-4:
        raise SystemExit(f"the routes disagree: {len(reference)} vs {len(plain)} rows, largest delta-loss gap {worst:.2e}")
    print(f"rows agree: {len(plain)} rows, largest delta-loss gap {worst:.1e}")

    # A smoke run times only the warm-up (it checks that the script runs, not a speed).
    ratios, control, took = ([first_bridge / first_plain], [1.0], {"bridge": first_bridge, "auto": first_plain}) \
        if args.smoke else ([], [], {})
    for pair in range(0 if args.smoke else args.pairs):
        order = ("bridge", "auto") if pair % 2 == 0 else ("auto", "bridge")
        took = {route: run(route)[0] for route in order}
        ratios.append(took["bridge"] / took["auto"])
        first, second = run("auto")[0], run("auto")[0]
        control.append(first / second)
        print(f"pair {pair}: bridge {took['bridge']:.1f} s, plain {took['auto']:.1f} s, ratio {ratios[-1]:.2f}; "
              f"plain/plain {control[-1]:.2f}", flush=True)
    ratio, same = statistics.median(ratios), statistics.median(control)
    print(f"bridge route / plain route (median of {args.pairs} pairs): {ratio:.2f}; A/A control {same:.2f}")
    results_file.finish("bench_attribution", {
        "ratio": round(ratio, 3), "control": round(same, 3), "pairs": [round(r, 3) for r in ratios],
        "seconds": {route: round(s, 1) for route, s in took.items()}, "layers": len(subspace.layers)}, {
        "ratio": f"head_attribution over {len(subspace.layers)} layers, keep and remove, {args.n} {args.task} "
                 f"examples: through the bridge's hook points vs through its plain HF model (the default)"}, args,
        detail=f"median of {args.pairs} interleaved pairs; A/A control {same:.2f}; last pair bridge "
               f"{took['bridge']:.0f} s, plain {took['auto']:.0f} s; rows equal within {worst:.0e}")


if __name__ == "__main__":
    main()
