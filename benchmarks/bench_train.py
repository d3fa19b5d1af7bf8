"""Trainer and evaluation speed against the references, in one run.

(1) Training tokens/s of `spd_lens.train` against TRL's `SFTTrainer` on the same model, data
    (self-generated arithmetic completions), LoRA settings (r=8, alpha=8, dropout 0.05, q/k/v/o),
    batch size and completion-only loss; one epoch each, same token count, each timed as a whole
    job (load the model, tokenise, train, save the adapter). Timed ours, TRL, ours: the second run
    of ours against the first is the A/A control.
(2) New tokens/s of `spd_lens.evaluate` (generation + scoring + JSONL export) against plain
    batched `generate` of the same prompts with the same settings.
The last line is one JSON object with the ratios; a full run also writes benchmarks/results/bench_train.json.
TRL comes with the dev extra (`pip install -e '.[dev]'`, or '.[bench]'); without it the TRL side
is skipped and said so.

    python benchmarks/bench_train.py [--records 128 --batch 8]
    python benchmarks/bench_train.py --smoke          # the tiny random model, a few records: seconds
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402


def train_with_trl(model_name, tokenizer, records, batch: int, out: Path) -> None:
    """TRL's SFTTrainer on the same conversations (the system turn each was sampled under)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from spd_lens.models import load_hf

    rows = []
    for record in records:
        system = [] if record.system is None else [{"role": "system", "content": record.system}] if record.system else []
        rows.append({"prompt": [*system, {"role": "user", "content": record.user}],
                     "completion": [{"role": "assistant", "content": record.assistant}]})
    model, _ = load_hf(model_name)
    model.train()
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                       learning_rate=1e-5, weight_decay=0.01, lr_scheduler_type="cosine", max_length=1024,
                       completion_only_loss=True, save_strategy="no", report_to=[], logging_strategy="no",
                       use_cpu=True, dataloader_num_workers=0, seed=0),
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-n", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, 4 records, 2 questions, short completions; writes no results")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.records, args.batch, args.eval_n = "tiny", 4, 4, 2
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed (pip install -e '.[dev]'): the TRL comparison is skipped")

    from spd_lens.chat import encode, end_of_turn_ids, render_prompt
    from spd_lens.evaluate import evaluate
    from spd_lens.models import load_hf
    from spd_lens.sampling import SamplingConfig, generate_jsonl
    from spd_lens.tasks import get_task
    from spd_lens.train import TrainConfig, build_features, read_training_records, train_on_jsonl

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, tokenizer = load_hf(args.model)
    task = get_task("arithmetic")
    data = generate_jsonl(model, tokenizer, task.examples("train", n=args.records, seed=0), work / "gen.jsonl",
                          SamplingConfig(temperature=1.0, max_new_tokens=8 if args.smoke else 40, batch_size=16), task="arithmetic")
    config = TrainConfig(epochs=1, batch_size=args.batch, checkpoint_every=10_000)
    records = read_training_records(data)
    tokens = sum(len(f["input_ids"]) for f in build_features(tokenizer, records, config))

    def ours(run: int) -> float:
        start = time.perf_counter()
        train_on_jsonl(args.model, data, work / f"ours{run}", config)
        return time.perf_counter() - start

    ours_first = ours(1)
    reference = None
    if have_trl:
        start = time.perf_counter()
        train_with_trl(args.model, tokenizer, records, args.batch, work / "trl")
        reference = time.perf_counter() - start
    ours_second = ours(2)
    ours_time = (ours_first + ours_second) / 2
    print(f"training, {len(records)} records, {tokens} tokens, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"  spd_lens trainer  {tokens / ours_first:8.1f} then {tokens / ours_second:8.1f} tokens/s")
    if reference:
        print(f"  TRL SFTTrainer    {tokens / reference:8.1f} tokens/s")

    examples = task.examples("test", n=args.eval_n, seed=0)
    budget = 8 if args.smoke else task.max_new_tokens
    sampling = SamplingConfig(max_new_tokens=budget, batch_size=16)
    start = time.perf_counter()
    evaluate(model, tokenizer, task, n=args.eval_n, config=sampling, generations=work / "eval.jsonl")
    ours_eval = time.perf_counter() - start
    new_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(examples), 16):
        batch = [encode(tokenizer, render_prompt(tokenizer, e.prompt)) for e in examples[i:i + 16]]
        length = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (length - len(b)) + [1] * len(b) for b in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                 eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        # Count up to and including each row's end-of-turn token (the rest is padding).
        for row in out[:, length:].tolist():
            stops = [k for k, t in enumerate(row) if t in end_of_turn_ids(tokenizer)]
            new_tokens += stops[0] + 1 if stops else len(row)
    plain_eval = time.perf_counter() - start
    print(f"evaluation, {args.eval_n} examples, {new_tokens} new tokens")
    print(f"  spd_lens evaluate {new_tokens / ours_eval:8.1f} new tokens/s")
    print(f"  plain generate    {new_tokens / plain_eval:8.1f} new tokens/s")
    summary = {"train_vs_trl": round(reference / ours_time, 3) if reference else None,
               "train_control": round(ours_first / ours_second, 3),
               "eval_vs_generate": round(plain_eval / ours_eval, 3),
               "train_tokens_per_s": {"spd_lens": round(tokens / ours_time, 1),
                                      "trl": round(tokens / reference, 1) if reference else None},
               "eval_new_tokens_per_s": {"spd_lens": round(new_tokens / ours_eval, 1),
                                         "generate": round(new_tokens / plain_eval, 1)}}
    if not args.smoke and reference:
        results_file.write("bench_train", [
            {"figure": f"training tokens/s vs TRL `SFTTrainer` (same LoRA, data, batch {args.batch}; "
                       f"{len(records)} records, whole job)", "ratio": summary["train_vs_trl"],
             "detail": f"{summary['train_tokens_per_s']['spd_lens']} vs {summary['train_tokens_per_s']['trl']} tokens/s "
                       f"(ours the mean of the runs before and after TRL's; A/A control {summary['train_control']})"},
            {"figure": "evaluation new tokens/s vs plain batched `generate`", "ratio": summary["eval_vs_generate"],
             "detail": f"{args.eval_n} arithmetic questions, one timing each"},
        ])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
