"""The whole chain on a CUDA GPU in a few minutes, with throughput figures (never run in CI).

    python benchmarks/gpu_check.py [--model smollm2-135m-instruct] [--device cuda] [--dtype auto]

On the default model (or --model), in the runtime's dtype (auto: bfloat16) unless said:
1. extraction: the arithmetic capability subspace from 64 calibration examples; its Gram
   matrices must be float64 and its bases close to those extracted in float32 (mean cos² of the
   principal angles);
2. projected decoding: greedy completions with projection hooks and with the projection folded
   into the weights must be equal token for token in float32; in the runtime dtype (where the
   two round differently) their next-token choices, fed the hooked completions, must agree as
   often as the hooked model's own choices in the runtime dtype and in float32 do (within 2
   points); the share of equal whole completions is reported;
3. sampling throughput: new tokens/s of batched greedy decoding, every row running to the same
   length (batch 64, 128 new tokens), plain and with the projection hooks;
4. training: LoRA steps (the paper's settings, one epoch over 256 self-generated records, batch
   16) in the runtime dtype: training tokens/s, float32 adapter weights, finite losses;
5. evaluation of the trained model on 128 held-out questions;
6. the paper's GSM8K config with only its model and sizes shrunk (experiments/paper/smoke.toml)
   end to end, on a generated GSM8K-format file, in the runtime dtype and in float32: every method
   finishes; the runtime-dtype run's trained psr adapter, evaluated as the run evaluates it, moves
   the next-token logits from the base model's by the same amount as the adapter applied exactly
   in float32 (share of the float32 change kept, cosine and norm ratio, within 1%), and the run's
   evaluation completions equal those of that float32 model;
7. where vLLM is installed (`bash run.sh setup-vllm`): vLLM on the folded checkpoint against the
   hooked model, greedy (share of identical completions, in float32 and the runtime dtype), its
   steady-state new tokens/s against the refill decoder's on the same prompts, and the trained
   adapter through vLLM's LoRA support against the HF evaluation (float32).

    python benchmarks/gpu_check.py --smoke

runs every step on the CPU with the tiny test model and small sizes (no throughput claims): a
check that the script itself works, for machines without a GPU.

It ends with one JSON line; `spd-lens plan CONFIG --figures FILE` estimates run times from a
file holding it (its keys sampling_tokens_per_s, train_tokens_per_s, extract_tokens_per_s).
Exit status 0 when every check passed, 1 when one failed, 2 without a CUDA device.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16), bfloat16, float16 or float32")
    parser.add_argument("--smoke", action="store_true",
                        help="every step on the CPU in bfloat16, tiny model and sizes: checks the script, not a GPU")
    args = parser.parse_args()

    import torch

    if args.smoke:
        args.model, args.device = ("tiny" if args.model == parser.get_default("model") else args.model), "cpu"
        args.dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    elif not torch.cuda.is_available():
        print(f"gpu_check.py needs a CUDA device, and none is visible here (torch {torch.__version__}, "
              f"{'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}). "
              "It checks the GPU path and is not part of the test suite: run it on a machine with a GPU.",
              file=sys.stderr)
        return 2

    from spd_lens import get_task
    from spd_lens.chat import encode, render_prompt
    from spd_lens.evaluate import evaluate
    from spd_lens.extract import extract_subspace
    from spd_lens.models import load_hf
    from spd_lens.plan import parameter_count
    from spd_lens.projection import Projection, fold_projection
    from spd_lens.runtime import Runtime
    from spd_lens.sampling import SamplingConfig, generate_jsonl, sample_completions
    from spd_lens.train import TrainConfig, build_features, read_training_records, train_on_jsonl

    runtime = Runtime.resolve(args.device, args.dtype)
    float32 = Runtime(runtime.device, torch.float32)
    if not runtime.is_cuda and not args.smoke:
        print(f"--device {args.device!r} is not a CUDA device", file=sys.stderr)
        return 2
    # Sizes: the full check on a GPU; --smoke shrinks every count so the CPU runs it in minutes.
    n = dict(calibration=8, prompts=4, tokens=12, batch=4, new_tokens=8, train=16, eval=8) if args.smoke else \
        dict(calibration=64, prompts=32, tokens=48, batch=64, new_tokens=128, train=256, eval=128)
    started = time.perf_counter()
    print(runtime.banner(), flush=True)
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.is_cuda else "cpu (--smoke)"
    figures: dict = {"device": device_name, "dtype": runtime.describe()["dtype"],
                     "model": args.model, "torch": torch.__version__}
    checks: dict[str, bool] = {}

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def synchronize():
        if runtime.is_cuda:
            torch.cuda.synchronize(runtime.device)

    def timed(fn):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        return result, time.perf_counter() - start

    task = get_task("arithmetic")
    model, tokenizer = load_hf(args.model, runtime)
    figures["parameters"] = parameter_count(model.config)
    log(f"{args.model} on {figures['device']} in {figures['dtype']} ({figures['parameters'] / 1e6:.0f}M parameters)")

    # 1. extraction
    calibration = task.examples("train", n=n["calibration"], seed=0)
    tokens = sum(len(task.locate(tokenizer, e).input_ids) for e in calibration)
    extract_subspace(model, calibration[:8], tokenizer=tokenizer, batch_size=16)  # warm-up
    subspace, seconds = timed(lambda: extract_subspace(model, calibration, tokenizer=tokenizer, batch_size=16))
    model32, _ = load_hf(args.model, float32)
    reference = extract_subspace(model32, calibration, tokenizer=tokenizer, batch_size=16)
    overlap = min(subspace.overlap(reference).values())
    figures.update(extract_examples_per_s=round(len(calibration) / seconds, 1), extract_tokens_per_s=round(tokens / seconds, 1),
                   extract_overlap_with_float32=round(overlap, 4))
    checks["grams_float64"] = all(g.dtype == torch.float64 for g in subspace.grams.values())
    checks["subspace_matches_float32"] = overlap > 0.95
    log(f"extraction: {figures['extract_examples_per_s']} examples/s, overlap with float32 {overlap:.4f}")

    # 2. hooked vs folded decoding. In float32 greedy completions must be equal token for token.
    # In bfloat16 the two round differently, and one flipped near-tie changes the rest of a
    # completion, so whole-completion equality says little. The check: fed the same tokens
    # (teacher forcing), the folded model's next-token choices differ from the hooked model's no
    # more often than the hooked model's own choices differ between bfloat16 and float32.
    prompts = [e.prompt for e in task.examples("test", n=n["prompts"], seed=0)]
    greedy = SamplingConfig(max_new_tokens=n["tokens"], batch_size=32)
    projection = Projection.build(subspace)

    def greedy_texts(m, hooked: bool) -> list[str]:
        with projection.apply(m) if hooked else contextlib.nullcontext():
            return [c[0].text for c in sample_completions(m, tokenizer, prompts, greedy)]

    def next_tokens(m, sequences, hooked: bool) -> torch.Tensor:
        with torch.no_grad(), projection.apply(m) if hooked else contextlib.nullcontext():
            return torch.cat([m(torch.tensor([ids], device=runtime.device)).logits[0, start - 1:-1].argmax(-1).cpu()
                              for ids, start in sequences])

    folded32 = fold_projection(model32, projection)
    equal32 = sum(a == b for a, b in zip(greedy_texts(model32, True), greedy_texts(folded32, False))) / len(prompts)
    del folded32
    folded = fold_projection(model, projection)
    hooked_texts = greedy_texts(model, True)
    equal = sum(a == b for a, b in zip(hooked_texts, greedy_texts(folded, False))) / len(prompts)
    sequences = []
    for prompt, completion in zip(prompts, hooked_texts):
        head = encode(tokenizer, render_prompt(tokenizer, prompt))
        sequences.append((head + tokenizer.encode(completion, add_special_tokens=False), len(head)))
    hooked_choice = next_tokens(model, sequences, True)
    folded_agreement = (next_tokens(folded, sequences, False) == hooked_choice).float().mean().item()
    dtype_agreement = (next_tokens(model32, sequences, True) == hooked_choice).float().mean().item()
    figures.update(folded_equals_hooked_float32=equal32 == 1.0, folded_hooked_equal_completions=round(equal, 3),
                   folded_hooked_next_token_agreement=round(folded_agreement, 4),
                   float32_hooked_next_token_agreement=round(dtype_agreement, 4))
    checks["folded_equals_hooked_float32"] = equal32 == 1.0
    checks["folded_within_rounding"] = folded_agreement >= dtype_agreement - 0.02
    del model32, folded
    log(f"hooked vs folded greedy: equal in float32 {equal32:.0%}; in {figures['dtype']} {equal:.0%} of completions "
        f"equal, next-token agreement {folded_agreement:.2%} (float32 vs {figures['dtype']}, both hooked: "
        f"{dtype_agreement:.2%})")

    # 3. sampling throughput (every row decodes exactly `new_tokens`)
    batch, new_tokens = n["batch"], n["new_tokens"]
    texts = [e.prompt for e in task.examples("test", n=batch, seed=1)]
    encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in texts]
    length = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded], device=runtime.device)
    mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded], device=runtime.device)

    def decode():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == length + new_tokens

    decode()  # warm-up
    _, plain = timed(decode)
    with Projection.build(subspace).apply(model):
        _, hooked = timed(decode)
    figures.update(sampling_batch=batch, sampling_tokens_per_s=round(batch * new_tokens / plain, 1),
                   hooked_sampling_tokens_per_s=round(batch * new_tokens / hooked, 1), hooked_vs_plain=round(plain / hooked, 3))
    log(f"sampling: {figures['sampling_tokens_per_s']} new tokens/s plain, {figures['hooked_sampling_tokens_per_s']} hooked")

    with tempfile.TemporaryDirectory(prefix="spd-gpu-check-") as work:
        work = Path(work)
        # 4. training on projected self-generations, the paper's LoRA settings, runtime dtype
        examples = task.examples("train", n=n["train"], seed=2)
        sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.8, max_new_tokens=n["tokens"], batch_size=64)
        with Projection.build(subspace).apply(model):
            data = generate_jsonl(model, tokenizer, examples, work / "gen.jsonl", sampling, task=task.name)
        config = TrainConfig(epochs=1, batch_size=16)
        train_tokens = sum(len(f["input_ids"]) for f in build_features(tokenizer, read_training_records(data), config))
        out = train_on_jsonl(args.model, data, work / "adapter", config, runtime=runtime)
        record = json.loads((out / "train.json").read_text())
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        figures.update(train_tokens_per_s=round(train_tokens / record["seconds_this_run"], 1), train_steps=record["steps"],
                       train_final_loss=record["final_losses"][-1])
        checks["adapter_float32"] = all(t.dtype == torch.float32 for t in adapter.values())
        checks["losses_finite"] = all(loss == loss and abs(loss) != float("inf") for loss in record["final_losses"])
        log(f"training: {figures['train_tokens_per_s']} tokens/s over {record['steps']} steps, last loss "
            f"{figures['train_final_loss']:.4f}")

        # 5. evaluation of the trained model
        from spd_lens.train import load_trained

        trained, _ = load_trained(args.model, out, runtime=runtime)
        result, seconds = timed(lambda: evaluate(trained, tokenizer, task, n=n["eval"],
                                                 config=SamplingConfig(max_new_tokens=n["tokens"], batch_size=64),
                                                 generations=work / "eval.jsonl"))
        figures.update(eval_seconds=round(seconds, 2), eval_score=result.score, eval_n=result.n)
        # evaluated in float32 whatever the runtime (spd_lens.precision: a small update survives only there)
        checks["evaluation_ran"] = result.n == n["eval"] and trained.dtype == torch.float32
        log(f"evaluation: {result.score:.3f} on {result.n} questions in {seconds:.1f} s")
        del trained, model

        # 6. the paper's config, shrunk, end to end in the runtime dtype and in float32
        paper_smoke(work, runtime, figures, checks, log)

        # 7. vLLM, where its environment is installed
        vllm_check(args, work, runtime, projection, out, result, n, figures, checks, log)

    figures.update(total_seconds=round(time.perf_counter() - started, 1), checks=checks, ok=all(checks.values()),
                   peak_memory_gb=round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 2) if runtime.is_cuda else None)
    failed = [name for name, ok in checks.items() if not ok]
    log("every check passed" if not failed else f"FAILED: {failed}")
    print(json.dumps(figures))
    return 0 if not failed else 1


def paper_smoke(work: Path, runtime, figures: dict, checks: dict, log) -> None:
    """experiments/paper/gsm8k.toml + smoke.toml through `spd-lens run`, in the runtime dtype and in
    float32; then the runtime-dtype run's trained psr model as its run evaluates it against the
    same adapter applied exactly in float32."""
    import torch

    from spd_lens.chat import encode, render_prompt
    from spd_lens.cli import main as cli
    from spd_lens.models import load_hf
    from spd_lens.runtime import Runtime, dtype_name
    from spd_lens.train import load_trained

    root = Path(__file__).resolve().parent.parent
    paper, smoke = root / "experiments" / "paper" / "gsm8k.toml", root / "experiments" / "paper" / "smoke.toml"
    files = {}
    for split, count in (("train", 16), ("test", 8)):
        files[split] = work / f"gsm8k-{split}.jsonl"
        with open(files[split], "w", encoding="utf-8") as handle:
            for i in range(count):
                a, b = 3 + i, 5 + 2 * i
                handle.write(json.dumps({"question": f"Tom has {a} apples ({split} {i}) and buys {b} more. How many now?",
                                         "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}) + "\n")
    data = work / "paper-data.toml"
    data.write_text(f'[task]\ndata = {{ train = "{files["train"]}", test = "{files["test"]}" }}\n')
    runs = {}
    for dtype in dict.fromkeys([dtype_name(runtime.dtype), "float32"]):
        runs[dtype] = work / f"paper-{dtype}"
        status = cli(["run", str(paper), "--override", str(smoke), "--override", str(data), "--out", str(runs[dtype]),
                      "--device", str(runtime.device), "--dtype", dtype])
        metrics = json.loads((runs[dtype] / "metrics.json").read_text()) if status == 0 else {}
        checks[f"paper_smoke_{dtype}_finished"] = status == 0 and not metrics.get("pending") and len(metrics["methods"]) == 6
        figures[f"paper_smoke_{dtype}_scores"] = {k: v["score"] for k, v in metrics.get("methods", {}).items()}
        log(f"paper config shrunk, {dtype}: {'finished' if checks[f'paper_smoke_{dtype}_finished'] else 'FAILED'}")
    run = runs[dtype_name(runtime.dtype)]
    if not checks[f"paper_smoke_{dtype_name(runtime.dtype)}_finished"]:
        return
    model_name, adapter = "tiny", run / "adapters" / "psr-seed0"
    exact32 = Runtime(runtime.device, torch.float32)
    evaluated, tokenizer = load_trained(model_name, adapter, runtime=runtime)  # as the run evaluates it
    reference, _ = load_trained(model_name, adapter, runtime=exact32)
    base, _ = load_hf(model_name, exact32)
    records = [json.loads(line) for line in open(run / "eval" / "psr-seed0.jsonl", encoding="utf-8")]
    with torch.no_grad():
        changes = {"evaluated": [], "exact": []}
        for record in records:
            ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, record["messages"][-2]["content"]))],
                               device=runtime.device)
            start = base(ids).logits[0, -1].float()
            changes["evaluated"].append(evaluated(ids).logits[0, -1].float() - start)
            changes["exact"].append(reference(ids).logits[0, -1].float() - start)
    kept, exact = torch.cat(changes["evaluated"]), torch.cat(changes["exact"])
    cosine = torch.nn.functional.cosine_similarity(kept, exact, dim=0).item()
    ratio = (kept.norm() / exact.norm()).item()
    figures.update(paper_smoke_update_kept_cosine=round(cosine, 4), paper_smoke_update_kept_norm_ratio=round(ratio, 4))
    checks["paper_smoke_trained_update_kept"] = cosine > 0.99 and abs(ratio - 1) < 0.01
    # The run's own evaluation completions, regenerated greedily by the exact float32 model.
    from spd_lens.sampling import SamplingConfig, sample_completions

    prompts = [r["messages"][-2]["content"] for r in records]  # the question the completion answers
    budget = json.loads((run / "config.json").read_text())["eval"]["max_new_tokens"]
    again = [c[0].text for c in sample_completions(reference, tokenizer, prompts,
                                                    SamplingConfig(max_new_tokens=budget, batch_size=len(prompts)))]
    same = sum(a == r["messages"][-1]["content"] for a, r in zip(again, records)) / len(records)
    figures["paper_smoke_eval_equal_to_float32"] = round(same, 3)
    checks["paper_smoke_eval_equals_float32"] = same == 1.0
    log(f"paper config shrunk: {dtype_name(runtime.dtype)} run's trained update kept: cosine {cosine:.4f}, norm ratio "
        f"{ratio:.4f}; its evaluation equal to float32's on {same:.0%} of completions")


def vllm_check(args, work: Path, runtime, projection, trained: Path, hf_result, n: dict, figures: dict,
               checks: dict, log) -> None:
    """Step 7 (see the module docstring); logs and returns when vLLM is not installed (or --smoke:
    vLLM does not load the tiny test model)."""
    import torch

    from spd_lens import get_task
    from spd_lens.engines import HFEngine, VLLMEngine, VLLMSettings, folded_checkpoint, vllm_python
    from spd_lens.errors import SpdLensError
    from spd_lens.evaluate import evaluate
    from spd_lens.models import load_hf
    from spd_lens.runtime import Runtime, dtype_name
    from spd_lens.sampling import SamplingConfig
    from spd_lens.train import load_trained

    try:
        vllm_python()
    except SpdLensError as err:
        log(f"vLLM: not installed, skipped ({err})")
        return
    if args.smoke:
        log("vLLM: skipped with --smoke (vLLM does not load the tiny test model)")
        return
    task = get_task("arithmetic")
    examples = task.examples("test", n=max(n["prompts"], 256), seed=0)
    greedy = SamplingConfig(max_new_tokens=n["tokens"], batch_size=64)
    settings = VLLMSettings(gpu_memory_utilization=0.4)  # this process holds models on the GPU too
    for rt in (Runtime(runtime.device, torch.float32), runtime):
        dtype = dtype_name(rt.dtype)
        model, tokenizer = load_hf(args.model, rt)
        checkpoint = folded_checkpoint(args.model, projection, work / f"folded-{dtype}", dtype=dtype)
        with VLLMEngine(checkpoint, dtype=dtype, settings=settings) as engine:
            start = time.perf_counter()
            served = sorted(engine.stream(model, tokenizer, examples, greedy, range(len(examples))))
            vllm_seconds = time.perf_counter() - start
        with projection.apply(model):
            start = time.perf_counter()
            hooked = sorted(HFEngine().stream(model, tokenizer, examples, greedy, range(len(examples))))
            hf_seconds = time.perf_counter() - start
        same = sum(a[2].text == b[2].text for a, b in zip(served, hooked)) / len(examples)
        tokens = sum(c.tokens for _, _, c in served), sum(c.tokens for _, _, c in hooked)
        figures[f"vllm_greedy_identical_{dtype}"] = round(same, 3)
        figures[f"vllm_tokens_per_s_{dtype}"] = round(tokens[0] / vllm_seconds, 1)
        figures[f"refill_tokens_per_s_{dtype}"] = round(tokens[1] / hf_seconds, 1)
        if dtype == "float32":
            checks["vllm_greedy_equals_hooked_float32"] = same >= 0.97
        log(f"vLLM {dtype}: greedy identical to hooked HF on {same:.1%} of {len(examples)}; "
            f"{figures[f'vllm_tokens_per_s_{dtype}']} vs {figures[f'refill_tokens_per_s_{dtype}']} new tokens/s")
        del model
    merged, tokenizer = load_trained(args.model, trained, runtime=runtime)  # float32, as evaluations are
    base = folded_checkpoint(args.model, None, work / "base-float32", dtype="float32")
    with VLLMEngine(base, dtype="float32", adapter=trained, settings=settings) as engine:
        served = evaluate(merged, tokenizer, task, n=n["eval"], generations=work / "vllm-eval.jsonl", engine=engine,
                          config=SamplingConfig(max_new_tokens=n["tokens"], batch_size=64))
    figures.update(vllm_lora_eval_score=served.score, hf_eval_score=hf_result.score)
    checks["vllm_lora_eval_matches_hf"] = abs(served.score - hf_result.score) * served.n <= 2
    log(f"vLLM LoRA evaluation: {served.score:.3f} against HF's {hf_result.score:.3f} on {served.n} questions")


if __name__ == "__main__":
    sys.exit(main())
