"""Trainer and evaluation speed on the default model, against the references, in one run.

(1) Training tokens/s of `spd_lens.train` against TRL's `SFTTrainer` on the same model, data
    (self-generated arithmetic completions), LoRA settings (r=8, alpha=8, dropout 0.05, q/k/v/o),
    batch size and completion-only loss; one epoch each, same token count, each timed as a whole
    job (load the model, tokenise, train, save the adapter).
(2) New tokens/s of `spd_lens.evaluate` (generation + scoring + JSONL export) against plain
    batched `generate` of the same prompts with the same settings.
The last line is one JSON object with the ratios. Needs `pip install -e '.[bench]'` (trl).

    python benchmarks/bench_train.py [--records 128 --batch 8]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-n", type=int, default=64)
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from spd_lens.chat import encode, end_of_turn_ids, render_prompt
    from spd_lens.evaluate import evaluate
    from spd_lens.models import load_hf
    from spd_lens.sampling import SamplingConfig, generate_jsonl
    from spd_lens.tasks import get_task
    from spd_lens.train import TrainConfig, build_features, read_training_records, train_on_jsonl

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, tokenizer = load_hf()
    task = get_task("arithmetic")
    data = generate_jsonl(model, tokenizer, task.examples("train", n=args.records, seed=0), work / "gen.jsonl",
                          SamplingConfig(temperature=1.0, max_new_tokens=40, batch_size=16), task="arithmetic")
    config = TrainConfig(epochs=1, batch_size=args.batch, checkpoint_every=10_000)
    pairs = read_training_records(data)
    tokens = sum(len(f["input_ids"]) for f in build_features(tokenizer, pairs, config))

    start = time.perf_counter()
    train_on_jsonl("smollm2-135m-instruct", data, work / "ours", config)
    ours = time.perf_counter() - start

    # Both sides are timed as a whole job: load the model, tokenise, train one epoch, save the adapter.
    start = time.perf_counter()
    rows = [{"prompt": [{"role": "user", "content": u}], "completion": [{"role": "assistant", "content": a}]}
            for u, a in pairs]
    trl_model, _ = load_hf()
    trl_model.train()
    trainer = SFTTrainer(
        model=trl_model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                       learning_rate=1e-5, weight_decay=0.01, lr_scheduler_type="cosine", max_length=1024,
                       completion_only_loss=True, save_strategy="no", report_to=[], logging_strategy="no",
                       use_cpu=True, dataloader_num_workers=0, seed=0),
    )
    trainer.train()
    trainer.save_model(str(work / "trl" / "adapter"))
    reference = time.perf_counter() - start
    print(f"training, {len(pairs)} records, {tokens} tokens, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"  spd_lens trainer  {tokens / ours:8.1f} tokens/s")
    print(f"  TRL SFTTrainer    {tokens / reference:8.1f} tokens/s")

    examples = task.examples("test", n=args.eval_n, seed=0)
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, batch_size=16)
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
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        # Count up to and including each row's end-of-turn token (the rest is padding).
        for row in out[:, length:].tolist():
            stops = [k for k, t in enumerate(row) if t in end_of_turn_ids(tokenizer)]
            new_tokens += stops[0] + 1 if stops else len(row)
    plain_eval = time.perf_counter() - start
    print(f"evaluation, {args.eval_n} examples, {new_tokens} new tokens")
    print(f"  spd_lens evaluate {new_tokens / ours_eval:8.1f} new tokens/s")
    print(f"  plain generate    {new_tokens / plain_eval:8.1f} new tokens/s")
    print(json.dumps({"train_vs_trl": round(reference / ours, 3), "eval_vs_generate": round(plain_eval / ours_eval, 3),
                      "train_tokens_per_s": {"spd_lens": round(tokens / ours, 1), "trl": round(tokens / reference, 1)},
                      "eval_new_tokens_per_s": {"spd_lens": round(new_tokens / ours_eval, 1),
                                                "generate": round(new_tokens / plain_eval, 1)}}))


if __name__ == "__main__":
    main()
