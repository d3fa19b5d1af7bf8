"""How much of a LoRA update trained in bfloat16 survives evaluation: the share of the exact logit
change (float64 base, adapter merged in float64) kept when the adapter is merged into bfloat16
weights (what `load_trained` did before `spd_lens.precision`) and as evaluated now (merged in
float32, evaluated in float32).

    python experiments/precision_kept.py tiny 2 12          # model, epochs, training prompts
    python experiments/precision_kept.py smollm2-135m-instruct 2 16
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from spd_lens import get_task
from spd_lens.models import load_hf
from spd_lens.runtime import Runtime
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.train import TrainConfig, build_features, collate, load_trained, read_training_records, train_on_jsonl

F32, BF16, F64 = Runtime.resolve("cpu", "float32"), Runtime.resolve("cpu", "bfloat16"), Runtime(torch.device("cpu"), torch.float64)


def kept(change: torch.Tensor, exact: torch.Tensor) -> dict:
    change, exact = change.double().flatten(), exact.double().flatten()
    cosine = float(change @ exact / (change.norm() * exact.norm()))
    ratio = float(change.norm() / exact.norm())
    return {"cosine": round(cosine, 4), "norm_ratio": round(ratio, 4), "share_kept": round(cosine * ratio, 4)}


def main(name: str, epochs: int, n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    model, tokenizer = load_hf(name, F32)
    examples = get_task("arithmetic").examples("train", n=n, seed=0)
    data = generate_jsonl(model, tokenizer, examples, tmp / "gen.jsonl", SamplingConfig(temperature=1.0, max_new_tokens=24),
                          task="arithmetic")
    del model
    out = train_on_jsonl(name, data, tmp / "lora", TrainConfig(lr=1e-5, epochs=epochs, batch_size=4), runtime=BF16)
    inputs = collate(build_features(tokenizer, read_training_records(data), TrainConfig()), tokenizer.pad_token_id)
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        base, _ = load_hf(name, F64)
        exact = -base(**inputs).logits
        exact += PeftModel.from_pretrained(base, str(out / "adapter")).double().merge_and_unload()(**inputs).logits
        del base
        half, _ = load_hf(name, BF16)
        before = -half(**inputs).logits.double()
        before += PeftModel.from_pretrained(half, str(out / "adapter")).merge_and_unload()(**inputs).logits.double()
        del half
        after = -load_hf(name, F32)[0](**inputs).logits.double()
        after += load_trained(name, out, runtime=BF16)[0](**inputs).logits.double()
    steps = json.loads((out / "train.json").read_text())["steps"]
    print(json.dumps({"model": name, "steps": steps, "lr": 1e-5, "before_bf16_merge": kept(before, exact),
                      "after_float32_evaluation": kept(after, exact)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
