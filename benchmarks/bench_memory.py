"""Peak resident memory of each stage on the default model at its default settings.

    python benchmarks/bench_memory.py            # every stage, each in a fresh process
    python benchmarks/bench_memory.py --stages extract,cache

Stages (each a fresh Python process, so one stage's peak is not another's):
- `extract`:  `extract_subspace(model, "arithmetic", n=32)` on the booted default model;
- `extract-humaneval`: the same on the 28 HumanEval training problems (long prompts: the budget at work);
- `cache`:    `cache_gradients(model, "humaneval", n=8)`, all 30 layers (the README's example);
- `sampling`: `generate_jsonl` of 64 arithmetic prompts, `SamplingConfig()` (refill decoding);
- `training`: `train_on_jsonl` on those 64 completions, `TrainConfig()` (LoRA, batch 4, 1 epoch).
Each row: the peak after loading the model, the stage's peak, its wall time. Besides, for the
gradient pass the estimate `spd_lens.memory` plans with against the measured peak growth, one
batch of humaneval-length rows per process. The last line is JSON with every figure (GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402

PRELUDE = r'''
import json, resource, time
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
import spd_lens
'''

STAGES = {
    "extract": '''
model = spd_lens.load_model(); loaded = peak(); t = time.time()
spd_lens.extract_subspace(model, "arithmetic", n=32)
''',
    "extract-humaneval": '''
model = spd_lens.load_model(); loaded = peak(); t = time.time()
spd_lens.extract_subspace(model, "humaneval", n=28)
''',
    "cache": '''
model = spd_lens.load_model(); loaded = peak(); t = time.time()
spd_lens.cache_gradients(model, "humaneval", n=8)
''',
    "sampling": '''
import tempfile
from spd_lens.sampling import SamplingConfig, generate_jsonl
hf, tok = spd_lens.load_hf(); loaded = peak(); t = time.time()
examples = spd_lens.get_task("arithmetic").examples("train", n=64)
generate_jsonl(hf, tok, examples, tempfile.mkdtemp() + "/gen.jsonl", SamplingConfig(), task="arithmetic")
''',
    "training": '''
import tempfile
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.train import TrainConfig, train_on_jsonl
work = tempfile.mkdtemp()
hf, tok = spd_lens.load_hf()
examples = spd_lens.get_task("arithmetic").examples("train", n=64)
generate_jsonl(hf, tok, examples, work + "/gen.jsonl", SamplingConfig(), task="arithmetic")
del hf
import gc; gc.collect()
loaded = peak(); t = time.time()
train_on_jsonl("smollm2-135m-instruct", work + "/gen.jsonl", work + "/adapter", TrainConfig(epochs=1))
''',
}

ESTIMATE = r'''
import sys
from spd_lens.gradients import iterate_gradients
from spd_lens.memory import gradient_pass_bytes
from spd_lens.models import boot, load_hf
from spd_lens.tasks.base import EncodedExample
path, batch, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hf, tok = load_hf()
model = hf if path == "plain" else boot(hf, tok)
rows = [EncodedExample(f"e{i}", [5] * length, [False] * (length - 3) + [True] * 3, [False] * (length - 3) + [True] * 3,
                       length - 3) for i in range(batch)]
list(iterate_gradients(model, rows[:1], layers=[29], batch_size=1, pad_id=0))  # one-time allocations
loaded = peak()
list(iterate_gradients(model, rows, layers=[0, 29], batch_size=batch, pad_id=0, max_memory="100GB",
                       capture="bridge" if path == "bridge" else "auto"))
estimate = gradient_pass_bytes(model, batch=batch, length=length, first_layer=0, full_logits=path == "bridge",
                              bridge_attention=path == "bridge")
print(json.dumps({"path": path, "batch": batch, "length": length, "measured_gb": round(peak() - loaded, 2),
                  "estimate_gb": round(estimate / 2**30, 2)}))
'''


def run(source: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + source, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--no-estimates", action="store_true")
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, stages="extract", no_estimates=True)
    report = {"stages": {}, "estimates": []}
    print(f"{'stage':<18} {'model loaded':>12} {'peak':>8} {'seconds':>8}")
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}: use some of {list(STAGES)}")
        tail = '\nprint(json.dumps({"loaded_gb": round(loaded, 2), "peak_gb": round(peak(), 2), "seconds": round(time.time() - t, 1)}))\n'
        source = STAGES[stage] if not args.smoke else STAGES[stage].replace("load_model()", f"load_model({args.model!r})").replace("n=32", "n=2")
        row = run(source + tail)
        report["stages"][stage] = row
        print(f"{stage:<18} {row['loaded_gb']:>9.2f} GB {row['peak_gb']:>5.2f} GB {row['seconds']:>8.1f}", flush=True)
    if not args.no_estimates:
        print(f"{'gradient pass':<18} {'batch x len':>12} {'measured':>9} {'estimate':>9}")
        for path, batch, length in (("plain", 4, 653), ("bridged", 1, 653), ("bridged", 4, 653), ("bridge", 2, 653)):
            row = run(ESTIMATE, path, str(batch), str(length))
            report["estimates"].append(row)
            print(f"{path:<18} {batch:>5} x {length:<4} {row['measured_gb']:>6.2f} GB {row['estimate_gb']:>6.2f} GB",
                  flush=True)
    if not args.smoke:
        results_file.write("bench_memory", [
            *({"figure": f"peak resident memory, {stage}", "ratio": None,
               "detail": f"{row['peak_gb']} GB peak, {row['loaded_gb']} GB with the model loaded, {row['seconds']} s"}
              for stage, row in report["stages"].items()),
            *({"figure": f"gradient pass memory, {row['path']}, {row['batch']} x {row['length']} tokens: estimate / measured",
               "ratio": round(row["estimate_gb"] / row["measured_gb"], 3),
               "detail": f"estimate {row['estimate_gb']} GB, measured {row['measured_gb']} GB"} for row in report["estimates"])])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
