"""Hostile completions against the code sandbox, run both as the suite's own uid (root in CI) and
as an ordinary uid: each fails (or times out) within its limit, and the machine is left as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spd_lens import SpdLensError, get_task, sandbox
from spd_lens.cli import main as cli
from spd_lens.sandbox import SANDBOX_UID, SandboxUnavailable, run_python, summarise_isolation

IS_ROOT = os.geteuid() == 0
USER_UID = 64990  # the ordinary uid the suite drops to (not the sandbox uid, so both can be told apart)
TIMEOUT = 2
PROTECTED = "/var/lib/spd_lens_test_protected"
SECRET = "spd-lens-test-secret-value"
SYSTEM_PYTHON = "/usr/bin/python3"


def hostile_programs(home: str, run: str) -> dict[str, str]:
    """HumanEval-style programs that attack `home` (the invoking user's) and `run` (the directory
    the evaluation runs from), the machine, and the harness."""
    return {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))",
        "deep recursion": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)",
        "delete a file in home": f"import os\nos.remove({home + '/keep.txt'!r})",
        "write a file in home": f"open({home + '/planted'!r}, 'w').write('x')",
        "delete the run directory": f"import shutil\nshutil.rmtree({run!r})",
        "write in the run directory": f"open({run + '/planted'!r}, 'w').write('x')",
        "delete through a shell": f"import subprocess\nsubprocess.run(['sh', '-c', 'rm -rf {home}/keep.txt {run} "
                                  f"{PROTECTED}'], check=True)\nassert False",
        "delete a root-owned directory": f"import shutil\nshutil.rmtree({PROTECTED!r})\nassert False",
        "scratch litter": "open('/tmp/spd_lens_litter', 'w').write('x')\nopen('/dev/shm/spd_lens_litter', 'w')"
                          ".write('x')\nassert False",
        "read an environment secret": f"import os\nassert os.environ.get('SPD_LENS_TEST_SECRET') == {SECRET!r}",
        "read other processes' environment": (
            "import os\nfound = False\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
            f"        found |= {SECRET!r} in open(f'/proc/{{pid}}/environ', errors='replace').read()\n"
            "    except OSError:\n        pass\nassert found"),
        "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "sys.exit(0)": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0)": "import os\nos._exit(0)",
        "raise SystemExit in hook": "import sys, atexit\natexit.register(lambda: print('fake'))\nraise SystemExit(0)",
        "raise own limits": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)\n"
                            "while True:\n    pass",
        "become root": "import os\nos.setuid(0)\nwhile True:\n    pass",
        "leave a daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nassert False",
        "kill every process": "import os, signal\nos.kill(-1, signal.SIGKILL)\nassert False",
        "remount the root writable": "import ctypes\nlibc = ctypes.CDLL(None)\n"
                                     "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0",
        "escape through a new user namespace": (
            "import ctypes, os\nlibc = ctypes.CDLL(None)\nuid, gid = os.getuid(), os.getgid()\n"
            "if libc.unshare(0x10000000 | 0x20000) == 0:\n"
            "    for name, text in (('setgroups', 'deny'), ('uid_map', f'0 {uid} 1'), ('gid_map', f'0 {gid} 1')):\n"
            "        open(f'/proc/self/{name}', 'w').write(text)\n"
            "    libc.mount(None, b'/', None, 32 | 4096 | 16384, None)\n"
            "    libc.umount2(b'/tmp', 2)\n"
            f"open({home + '/planted'!r}, 'w').write('x')"),
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n"
                   "socket.create_connection(('1.1.1.1', 53), timeout=2)",
    }


def _make_places(home: Path, run: Path, owner: int) -> None:
    for directory in (home, run):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "keep.txt").write_text("keep")
    (home / "secret.txt").write_text(SECRET)
    (home / "secret.txt").chmod(0o600)
    home.chmod(0o700)
    for path in (home, run, home / "keep.txt", home / "secret.txt", run / "keep.txt"):
        os.chown(path, owner, owner)


def _assert_left_intact(home: Path, run: Path) -> None:
    assert (home / "keep.txt").read_text() == "keep" and not (home / "planted").exists()
    assert (run / "keep.txt").read_text() == "keep" and not (run / "planted").exists()
    assert (Path(PROTECTED) / "keep.txt").read_text() == "keep"
    assert not os.path.exists("/tmp/spd_lens_litter") and not os.path.exists("/dev/shm/spd_lens_litter")


@pytest.fixture(scope="module")
def protected_dir():
    os.makedirs(PROTECTED, exist_ok=True)
    (Path(PROTECTED) / "keep.txt").write_text("keep")
    os.environ["SPD_LENS_TEST_SECRET"] = SECRET
    yield PROTECTED
    os.environ.pop("SPD_LENS_TEST_SECRET", None)


@pytest.fixture(scope="module")
def invoker_places(protected_dir):
    """The suite's own user's home (a directory in the real $HOME) and a run directory."""
    home = Path.home() / f".spd_lens_sandbox_test_{os.getpid()}"
    run = Path(f"/var/lib/spd_lens_sandbox_run_{os.getpid()}")
    _make_places(home, run, os.geteuid())
    yield home, run
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)


def _processes_of(uid: int) -> list[str]:
    """'pid name' of the live processes of `uid` (zombies are already dead)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if int(status["Uid"].split()[0]) == uid and not status["State"].strip().startswith("Z"):
            found.append(f"{pid} {status['Name'].strip()}")
    return found


@pytest.mark.parametrize("name", list(hostile_programs("HOME", "RUN")))
def test_hostile_program_fails_within_its_limit(name, invoker_places):
    home, run = invoker_places
    started = time.time()
    result = run_python(hostile_programs(str(home), str(run))[name], timeout=TIMEOUT)
    elapsed = time.time() - started
    assert result.status in ("failed", "timeout", "error"), (name, result)
    assert elapsed < TIMEOUT + 5, elapsed
    _assert_left_intact(home, run)
    assert SECRET not in result.stdout
    if IS_ROOT:
        assert _processes_of(SANDBOX_UID) == []


# --- as an ordinary uid -------------------------------------------------------------------------

class Unprivileged:
    """A world-readable copy of the sandbox modules, a driver, and a home and run directory owned
    by USER_UID; `run(plan)` runs the driver as that uid with the system python3."""

    def __init__(self, root: Path):
        self.root = root
        self.home, self.run_dir, self.lib = root / "home", root / "run", root / "lib"
        package = self.lib / "spd_lens"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        source = Path(sandbox.__file__).parent
        for name in ("sandbox.py", "sandbox_init.py", "errors.py"):
            shutil.copy(source / name, package / name)
        shutil.copy(Path(__file__).parent / "sandbox_driver.py", root / "driver.py")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _make_places(self.home, self.run_dir, USER_UID)

    def start(self, runs: list[dict], **plan) -> subprocess.Popen:
        plan_path = self.root / f"plan-{time.time_ns()}.json"
        plan_path.write_text(json.dumps({"runs": runs, **plan}))
        plan_path.chmod(0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "SPD_LENS_TEST_SECRET": SECRET, "LANG": "C.UTF-8"}
        return subprocess.Popen([SYSTEM_PYTHON, "-I", str(self.root / "driver.py"), str(self.lib), str(plan_path)],
                                user=USER_UID, group=USER_UID, extra_groups=[], env=env, cwd=self.run_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def results(driver: subprocess.Popen) -> dict:
        stdout, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr
        return json.loads(stdout)

    def run(self, runs: list[dict], **plan) -> dict:
        return self.results(self.start(runs, **plan))


@pytest.fixture(scope="module")
def unprivileged(protected_dir):
    if not IS_ROOT:
        pytest.skip(f"the suite runs as uid {os.geteuid()}, not root: it cannot switch to another uid (the hostile "
                    "table above already ran as this ordinary uid)")
    probe = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "pass"], user=USER_UID, group=USER_UID, extra_groups=[],
                           capture_output=True, cwd="/") if os.path.exists(SYSTEM_PYTHON) else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"no Python that uid {USER_UID} can execute at {SYSTEM_PYTHON} (needed to run the sandbox as an "
                    "ordinary user)")
    if _processes_of(USER_UID):
        pytest.skip(f"uid {USER_UID} already runs processes here, so leftovers could not be told apart")
    root = Path(f"/var/lib/spd_lens_sandbox_users_{os.getpid()}")  # not under /tmp, which the sandbox hides anyway
    try:
        yield Unprivileged(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def user_table_driver(request):
    """Every hostile program, run once by the ordinary uid: started first, in the background, so
    that it runs beside the tests run as the suite's own uid."""
    try:
        unprivileged = request.getfixturevalue("unprivileged")
    except pytest.skip.Exception:
        yield None
        return
    programs = hostile_programs(str(unprivileged.home), str(unprivileged.run_dir))
    runs = [{"name": n, "program": p, "timeout": TIMEOUT} for n, p in programs.items()]
    runs += [{"name": f"strict: {n}", "program": programs[n], "timeout": TIMEOUT, "options": {"strict": True}}
             for n in STRICT_TOO]
    runs.append({"name": "count forks", "program": COUNT_FORKS, "timeout": 4})
    # The user's own session runs more processes than the sandbox's bound all along.
    driver = unprivileged.start(runs, background_processes=BACKGROUND)
    yield driver
    if driver.poll() is None:  # only some tests ran: stop it and the processes it started
        driver.kill()
        driver.wait()
        for line in _processes_of(USER_UID):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def user_table(unprivileged, user_table_driver):
    results = unprivileged.results(user_table_driver)
    unavailable = [r["message"] for r in results.values() if r.get("exception") == "SandboxUnavailable"]
    if unavailable:
        # Skip only where the kernel itself refuses this uid a user namespace; else it is a bug here.
        probe = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare("
                                "0x10000000 | 0x20000 | 0x20000000 | 0x40000000) != 0)"],
                               user=USER_UID, group=USER_UID, extra_groups=[], cwd="/")
        assert probe.returncode != 0, f"user namespaces work for uid {USER_UID}, but the sandbox said: {unavailable[0]}"
        pytest.skip(f"unprivileged user namespaces are not available to uid {USER_UID}: {unavailable[0]}")
    return results


BACKGROUND = sandbox.PROCESSES + 6
COUNT_FORKS = ("import os, time\ncount = 0\ntry:\n    while count < 500:\n        if os.fork() == 0:\n"
               "            time.sleep(5)\n            os._exit(0)\n        count += 1\nexcept OSError:\n    pass\n"
               "print(count, flush=True)\nassert count == 500")
# Strict mode changes what is visible, not the limits: the table without the CPU, memory and
# process bombs, whose outcome the view does not decide.
STRICT_TOO = [n for n in hostile_programs("HOME", "RUN") if n not in (
    "infinite loop", "fork bomb", "memory bomb", "deep recursion", "raise own limits", "become root")]


@pytest.mark.parametrize("name", list(hostile_programs("HOME", "RUN")) + [f"strict: {n}" for n in STRICT_TOO])
def test_hostile_program_fails_as_an_ordinary_user(name, user_table, unprivileged):
    result = user_table[name]
    assert "exception" not in result, result
    assert result["status"] in ("failed", "timeout", "error"), (name, result)
    assert result["seconds"] < TIMEOUT + 5, result["seconds"]
    _assert_left_intact(unprivileged.home, unprivileged.run_dir)
    assert SECRET not in result["stdout"]
    assert result["left"] == [] and result["sentinel_alive"], result
    assert result["isolation"]["mode"] == "user-namespaces" and result["isolation"]["uid"] == USER_UID
    assert result["isolation"]["strict"] == name.startswith("strict: ")


def test_isolation_is_reported_as_an_ordinary_user(user_table):
    assert _processes_of(USER_UID) == []  # the driver has exited: nothing of any run outlived it
    isolation = user_table["infinite loop"]["isolation"]
    assert isolation["namespaces"] == ["user", "mount", "pid", "network"]
    assert isolation["read_only_root"] and not isolation["strict"] and not isolation["network"]
    assert isolation["limits"] == {"cpu_seconds": TIMEOUT + 1, "memory_mb": 1024, "file_size_mb": 10,
                                   "open_files": 64, "processes": 64}


def test_process_bound_counts_the_run_not_the_users_session(user_table):
    """The user runs more processes than the bound: the run can still fork (the limit counts its
    own user namespace, not the user's session), and a fork bomb stops at the bound."""
    result = user_table["count forks"]
    forks = int(result["stdout"].strip())
    assert 20 <= forks < sandbox.PROCESSES, result
    assert result["status"] == "failed" and result["left"] == [] and result["sentinel_alive"]


def test_reading_the_users_files(invoker_places, unprivileged):
    """Read-only is not hidden: the default view shows the user's own files; strict shows none."""
    read = "print(open({!r}).read())"
    as_root = run_python(read.format(str(invoker_places[0] / "secret.txt")))
    as_root_strict = run_python(read.format(str(invoker_places[0] / "secret.txt")), strict=True)
    secret = str(unprivileged.home / "secret.txt")
    as_user = unprivileged.run([{"name": "default", "program": read.format(secret)},
                                {"name": "strict", "program": read.format(secret), "options": {"strict": True}}])
    if IS_ROOT:
        assert as_root.status == "failed" and "PermissionError" in as_root.stderr  # the sandbox uid is not root
    assert as_root_strict.status == "failed" and "FileNotFoundError" in as_root_strict.stderr
    assert as_user["default"]["status"] == "passed" and SECRET in as_user["default"]["stdout"]
    assert as_user["strict"]["status"] == "failed" and "FileNotFoundError" in as_user["strict"]["stderr"]
    assert as_user["strict"]["isolation"]["strict"]


STRICT_PROGRAM = """\
import collections, json, math, os, re, subprocess
open('out.txt', 'w').write(json.dumps({'pi': round(math.pi, 2)}))
open('/tmp/scratch', 'w').write('ok')
assert json.load(open('out.txt')) == {'pi': 3.14} and open('/tmp/scratch').read() == 'ok'
assert not os.path.exists('/etc/passwd')
visible = sorted(os.listdir('/'))
print(visible)
"""


def test_strict_mode_runs_ordinary_programs_and_shows_little(unprivileged):
    result = run_python(STRICT_PROGRAM, strict=True)
    as_user = unprivileged.run([{"name": "strict", "program": STRICT_PROGRAM, "options": {"strict": True}}])["strict"]
    for status, stdout in ((result.status, result.stdout), (as_user["status"], as_user["stdout"])):
        assert status == "passed", (result, as_user)
        assert not {"home", "root", "var/lib", "opt", "srv", "mnt", "media", "work"} & set(eval(stdout)), stdout
    assert result.isolation["strict"] and as_user["isolation"]["strict"]


def test_unavailable_isolation_refuses_unless_unsafe(unprivileged):
    """Where no user namespace can be made (and not root), running refuses; allowed explicitly,
    it runs with limits only and says so."""
    results = unprivileged.run([{"name": "refused", "program": "pass"},
                                {"name": "unsafe", "program": "print('ran')", "options": {"allow_unsafe": True}}],
                               block_user_namespaces=True)
    refused, unsafe = results["refused"], results["unsafe"]
    assert refused["exception"] == "SandboxUnavailable"
    assert "user-namespaces:" in refused["message"] and "--unsafe-sandbox" in refused["message"]
    assert unsafe["status"] == "passed" and unsafe["stdout"] == "ran"
    assert unsafe["isolation"]["mode"] == "unsafe" and unsafe["isolation"]["namespaces"] == []
    assert not unsafe["isolation"]["read_only_root"] and unsafe["left"] == []


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed: the optional "
                                                          "backend cannot be tried")
def test_bubblewrap_backend(unprivileged):
    programs = hostile_programs(str(unprivileged.home), str(unprivileged.run_dir))
    names = ["write a file in home", "delete the run directory", "leave a daemon", "fork bomb", "network",
             "scratch litter", "read other processes' environment", "escape through a new user namespace"]
    options = {"backend": "bwrap"}
    runs = [{"name": n, "program": programs[n], "timeout": TIMEOUT, "options": options} for n in names]
    runs += [{"name": "ordinary", "program": "print(sum(range(10)))", "options": options},
             {"name": "strict", "program": STRICT_PROGRAM, "options": {**options, "strict": True}}]
    results = unprivileged.run(runs)
    for name in names:
        assert results[name]["status"] in ("failed", "timeout", "error") and results[name]["left"] == [], results[name]
        assert results[name]["isolation"]["mode"] == "bubblewrap"
    _assert_left_intact(unprivileged.home, unprivileged.run_dir)
    assert results["ordinary"]["status"] == "passed" and results["ordinary"]["stdout"] == "45"
    assert results["strict"]["status"] == "passed", results["strict"]
    assert "home" not in eval(results["strict"]["stdout"])


# --- as the suite's own uid ---------------------------------------------------------------------

def test_isolation_is_reported():
    result = run_python("pass")
    assert result.passed
    isolation = result.isolation
    assert isolation["read_only_root"] and not isolation["network"] and isolation["limits"]["processes"] == 64
    if IS_ROOT:
        assert isolation["mode"] == "root" and isolation["uid"] == SANDBOX_UID
        assert isolation["namespaces"] == ["mount", "pid", "network"]
    summary = summarise_isolation([{"sandbox": isolation}, {"sandbox": isolation}, {"passed": True}])
    assert summary["runs"] == 2 and summary["unsafe_runs"] == 0 and summary["isolation"] == [isolation]
    assert summarise_isolation([{"passed": True}]) is None


def test_a_world_writable_host_directory_is_read_only_inside(tmp_path, unprivileged):
    """Permissions alone would let the program write here; the read-only view does not. Also with
    the remount fallback for kernels without mount_setattr (sandbox_init run directly), as root and
    as the ordinary uid."""
    shared = Path(f"/var/lib/spd_lens_sandbox_shared_{os.getpid()}")
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    try:
        program = f"open({str(shared / 'planted')!r}, 'w').write('x')"
        assert run_python(program).status == "failed"
        staging = unprivileged.root / "staging"
        staging.mkdir()
        os.chown(staging, USER_UID, USER_UID)
        for mode, python, uid in (("root", sandbox.sandbox_python(), SANDBOX_UID), ("user", SYSTEM_PYTHON, None)):
            spec = {"mode": mode, "network": False, "strict": False, "workdir": str(staging), "uid": uid,
                    "visible": [], "legacy_remount": True, "argv": [python, "-I", "-c", program]}
            as_user = {} if mode == "root" else {"user": USER_UID, "group": USER_UID, "extra_groups": []}
            legacy = subprocess.run([python, "-I", "-S", str(unprivileged.lib / "spd_lens" / "sandbox_init.py"),
                                     json.dumps(spec)], cwd=staging, capture_output=True, text=True, timeout=60,
                                    **as_user)
            assert legacy.returncode == 1 and "Read-only file system" in legacy.stderr, (mode, legacy.stderr)
        assert not (shared / "planted").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_output_is_capped():
    result = run_python("print('y' * 10**6)", max_output=1000)
    assert result.passed and len(result.stdout) <= 1000


def test_score_cli_goes_on_after_hostile_problems(tmp_path, protected_dir, monkeypatch):
    from spd_lens.tasks.code import CodeTask

    monkeypatch.setattr(CodeTask, "timeout", TIMEOUT)
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
    assert saved["sandbox"]["runs"] == 5 and saved["sandbox"]["unsafe_runs"] == 0


def test_scoring_code_refuses_without_isolation_unless_unsafe(tmp_path, monkeypatch, capsys):
    """Where no isolation works (simulated: every probe fails), `score` refuses before running
    anything, naming the flag; with --unsafe-sandbox it scores and records that in its output."""
    monkeypatch.setattr(sandbox, "_probe", lambda mode, strict: f"unshare failed ({mode})")
    task = get_task("humaneval")
    good = next(e for e in task.examples("test") if e.id == "HumanEval/1")
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"prompt_id": "HumanEval/1", "completion": good.reference}) + "\n")
    out = tmp_path / "s.json"
    assert cli(["score", "--task", "humaneval", "--completions", str(completions), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "refusing to run model-written code" in error and "--unsafe-sandbox" in error and not out.exists()
    assert cli(["score", "--task", "humaneval", "--completions", str(completions), "--out", str(out),
                "--unsafe-sandbox"]) == 0
    saved = json.loads(out.read_text())
    assert saved["score"] == 1.0 and saved["sandbox"]["unsafe_runs"] == 1
    assert saved["sandbox"]["isolation"][0]["mode"] == "unsafe"


def test_sandbox_options_reach_the_code_task():
    from spd_lens.sandbox import SandboxOptions
    from spd_lens.tasks.code import configure_sandbox

    task = configure_sandbox(get_task("humaneval"), SandboxOptions(strict=True))
    example = task.examples("test", n=1)[0]
    verdict = task.score(example, example.reference)
    assert verdict.passed and verdict.isolation["strict"]
    with pytest.raises(SpdLensError, match="unknown sandbox backend 'docker'"):
        SandboxOptions(backend="docker")


def test_config_sandbox_section(tmp_path):
    from spd_lens.config import config_from_dict
    from spd_lens.sandbox import SandboxOptions

    config = config_from_dict({"sandbox": {"strict": True, "unsafe": True, "backend": "bwrap"}})
    assert config.sandbox == SandboxOptions(strict=True, unsafe=True, backend="bwrap")
    assert config_from_dict({}).sandbox == SandboxOptions()
    with pytest.raises(SpdLensError, match="unknown sandbox backend 'nsjail'"):
        config_from_dict({"sandbox": {"backend": "nsjail"}})
    with pytest.raises(SpdLensError, match="did you mean 'unsafe'"):
        config_from_dict({"sandbox": {"unsafe_": True}})
    # run and ablate: the command line's flags add to the config's section
    from spd_lens.cli import build_parser
    from spd_lens.cli.common import with_sandbox_flags

    args = build_parser().parse_args(["run", "x.toml", "--unsafe-sandbox", "--sandbox-backend", "bwrap"])
    flagged = with_sandbox_flags(config_from_dict({"sandbox": {"strict": True}}), args)
    assert flagged.sandbox == SandboxOptions(strict=True, unsafe=True, backend="bwrap")


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
