"""The vLLM side of `spd_lens.engines.VLLMEngine`: run by the interpreter of vLLM's own environment.

It imports nothing from spd_lens (vLLM's environment pins other transformers than the project's),
only vllm and the standard library. Started as `PYTHON vllm_worker.py`, it reads one JSON line on
stdin that sets up the engine:

    {"model": DIR, "dtype": "float32", "max_model_len": 1024, "enable_lora": false,
     "max_lora_rank": 8, "tensor_parallel_size": 1, "data_parallel_size": 1, "seed": 0}

answers `{"ready": true, "vllm": VERSION}` on its protocol stream, then serves one JSON request a
line until stdin closes:

    {"rows": [{"row": 0, "prompt_token_ids": [...], "seed": 123}, ...],
     "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 64,
                  "stop_token_ids": [2], "stop": []},
     "adapter": null | DIR, "chunk": 64, "id": 7}

answering `{"id": 7, "row": i, "token_ids": [...], "finish_reason": "stop" | "length"}` for every
row (in chunks of `chunk` rows, so the caller writes records as they come), then
`{"id": 7, "done": true}`.
The protocol stream is the original stdout; everything vLLM prints goes to stderr.
"""

import json
import os
import sys


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints and logs (and its workers', which inherit fd 1) go to stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    setup = json.loads(sys.stdin.readline())
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        options = dict(model=setup["model"], tokenizer=setup["model"], dtype=setup["dtype"],
                       max_model_len=setup["max_model_len"], enforce_eager=setup.get("enforce_eager", True),
                       seed=setup.get("seed", 0), generation_config="vllm",
                       tensor_parallel_size=setup.get("tensor_parallel_size", 1))
        if setup.get("data_parallel_size", 1) > 1:
            options["data_parallel_size"] = setup["data_parallel_size"]
        if setup.get("enable_lora"):
            options.update(enable_lora=True, max_lora_rank=setup.get("max_lora_rank", 8), max_loras=1)
        if setup.get("max_num_seqs"):
            options["max_num_seqs"] = setup["max_num_seqs"]
        if setup.get("gpu_memory_utilization"):
            options["gpu_memory_utilization"] = setup["gpu_memory_utilization"]
        llm = LLM(**options)
    except Exception as err:  # reported to the caller, which raises it with the log's tail
        send({"error": f"{type(err).__name__}: {err}"})
        return 1
    send({"ready": True, "vllm": vllm.__version__})
    adapters: dict[str, int] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        tag = {"id": request.get("id")}  # echoed, so a caller that stopped reading can skip stale answers
        try:
            s = request["sampling"]
            lora = None
            if request.get("adapter"):
                path = request["adapter"]
                adapters.setdefault(path, len(adapters) + 1)
                lora = LoRARequest(f"adapter{adapters[path]}", adapters[path], path)
            rows = request["rows"]
            chunk = max(1, int(request.get("chunk", 64)))
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                params = [SamplingParams(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or 0,
                                         max_tokens=s["max_tokens"], seed=r["seed"],
                                         stop_token_ids=s["stop_token_ids"], stop=s["stop"] or None,
                                         skip_special_tokens=True)
                          for r in part]
                prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in part]
                outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                for r, out in zip(part, outputs):
                    completion = out.outputs[0]
                    send({**tag, "row": r["row"], "token_ids": list(completion.token_ids),
                          "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
            send({**tag, "done": True})
        except Exception as err:
            send({**tag, "error": f"{type(err).__name__}: {err}"})
    return 0


if __name__ == "__main__":  # vLLM starts its engine processes by spawn: they re-import this file
    sys.exit(main())
