"""Helpers shared by tests: interrupting runs with SIGKILL, reading what runs wrote."""

import os
import signal
import subprocess
import time


def kill_when(command: list[str], ready, *, timeout: float = 120, poll: float = 0.02, sig=signal.SIGKILL,
              returncode: list | None = None, env: dict | None = None) -> bool:
    """Run `command`; send it `sig` (kill -9 by default) once `ready()` is true. True if it was
    still running then; its exit status is appended to `returncode` when given."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(poll)
    running = process.poll() is None
    if running:
        os.kill(process.pid, sig)
    process.wait(timeout=timeout)
    if returncode is not None:
        returncode.append(process.returncode)
    return running


def read_records(path) -> list[dict]:
    import json

    return [json.loads(line) for line in open(path)]


def adapter_tensors(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
