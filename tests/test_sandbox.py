"""Hostile completions against the code sandbox: each fails (or times out) within its limit, and
the machine is left as it was."""

import json
import os
import subprocess
import time

import pytest

from spd_lens import get_task
from spd_lens.cli import main as cli
from spd_lens.sandbox import SANDBOX_UID, network_isolation_available, run_python

IS_ROOT = os.geteuid() == 0
PROTECTED = "/var/lib/spd_lens_test_protected"
SECRET = "spd-lens-test-secret-value"

HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))",
    "deep recursion": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)",
    "delete outside": f"import shutil\nshutil.rmtree({PROTECTED!r})\nassert False",
    "write outside": f"open({PROTECTED + '/planted'!r}, 'w').write('x')",
    "scratch litter": "open('/tmp/spd_lens_litter', 'w').write('x')\nopen('/dev/shm/spd_lens_litter', 'w').write('x')\nassert False",
    "read secrets": f"import os\nassert os.environ.get('SPD_LENS_TEST_SECRET') == {SECRET!r}",
    "read home": "print(open('/root/.bashrc').read())",
    "spawn shell": f"import subprocess\nsubprocess.run(['sh', '-c', 'rm -rf {PROTECTED}'], check=True)\nassert False",
    "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "sys.exit(0)": "import sys\nsys.exit(0)\nassert False",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit in hook": "import sys, atexit\natexit.register(lambda: print('fake'))\nraise SystemExit(0)",
    "raise own limits": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)\nwhile True:\n    pass",
    "become root": "import os\nos.setuid(0)\nwhile True:\n    pass",
    "leave a daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nassert False",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
}


@pytest.fixture(scope="module")
def protected_dir():
    os.makedirs(PROTECTED, exist_ok=True)
    with open(os.path.join(PROTECTED, "keep.txt"), "w") as f:
        f.write("keep")
    os.environ["SPD_LENS_TEST_SECRET"] = SECRET
    yield PROTECTED
    os.environ.pop("SPD_LENS_TEST_SECRET", None)


def _sandbox_processes() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-u", str(SANDBOX_UID)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1][0] != "Z"]  # zombies are already dead


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails_within_its_limit(name, protected_dir):
    started = time.time()
    result = run_python(HOSTILE[name], timeout=3)
    elapsed = time.time() - started
    assert result.status in ("failed", "timeout", "error"), (name, result)
    assert elapsed < 3 + 5, elapsed
    assert open(os.path.join(protected_dir, "keep.txt")).read() == "keep"
    assert not os.path.exists(os.path.join(protected_dir, "planted"))
    assert not os.path.exists("/tmp/spd_lens_litter") and not os.path.exists("/dev/shm/spd_lens_litter")
    assert SECRET not in result.stdout
    if IS_ROOT:
        time.sleep(0.2)
        assert _sandbox_processes() == []


def test_isolation_is_reported():
    result = run_python("pass")
    assert result.passed
    if IS_ROOT:
        assert result.isolation["uid"] == SANDBOX_UID
        assert result.isolation["network_isolated"] == network_isolation_available()


def test_output_is_capped():
    result = run_python("print('y' * 10**6)", max_output=1000)
    assert result.passed and len(result.stdout) <= 1000


def test_score_cli_goes_on_after_hostile_problems(tmp_path, protected_dir):
    task = get_task("humaneval")
    good = next(e for e in task.examples("test") if e.id == "HumanEval/1")
    body = "    return []\n"
    records = [
        {"prompt_id": "HumanEval/0", "completion": "```python\nwhile True:\n    pass\n```"},
        {"prompt_id": "HumanEval/2", "completion": "```python\nimport os\nos._exit(0)\n```"},
        {"prompt_id": "HumanEval/4", "completion": "```python\ndef check(candidate):\n    pass\n```"},
        {"prompt_id": "HumanEval/1", "completion": good.reference},
        {"prompt_id": "HumanEval/5", "completion": body},
    ]
    completions = tmp_path / "c.jsonl"
    completions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "s.json"
    assert cli(["score", "--task", "humaneval", "--completions", str(completions), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    statuses = {r["prompt_id"]: r["status"] for r in saved["results"]}
    assert statuses == {"HumanEval/0": "timeout", "HumanEval/2": "failed", "HumanEval/4": "failed",
                        "HumanEval/1": "passed", "HumanEval/5": "failed"}
    assert saved["score"] == pytest.approx(0.2) and saved["ci"][0] <= 0.2 <= saved["ci"][1]


def test_score_accepts_the_generate_export_and_rejects_unknown_ids(tmp_path, capsys):
    task = get_task("arithmetic")
    example = task.examples("test", n=2, seed=4)[1]
    record = {"prompt_id": example.id, "messages": [{"role": "user", "content": example.prompt},
                                                    {"role": "assistant", "content": f"The answer is {example.target}."}]}
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert cli(["score", "--task", "arithmetic", "--completions", str(path), "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["score"] == 1.0
    path.write_text(json.dumps({"prompt_id": "arithmetic/test/0/notanumber", "completion": "1"}) + "\n")
    assert cli(["score", "--task", "arithmetic", "--completions", str(path), "--out", str(tmp_path / "o.json")]) == 2
    assert "not an example id" in capsys.readouterr().err
