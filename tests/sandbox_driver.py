"""Runs sandboxed programs as an ordinary user; started by tests/test_sandbox.py as an unprivileged
uid with a Python that uid can execute (the system python3), so standard library only.

    python3 -I sandbox_driver.py LIB_DIR PLAN.json   ->   JSON results on stdout

LIB_DIR holds a world-readable copy of spd_lens's sandbox modules. PLAN: {"runs": [{"name",
"program", "timeout", "options"}], "block_user_namespaces": bool, "background_processes": int}.
Each result has the run's status, seconds, stdout/stderr tails, isolation, and the processes of
this uid still alive after it (besides this driver, a sentinel it started, which must survive
every run, and the background processes).
"""

import ctypes
import json
import os
import subprocess
import sys
import time


def my_processes(exclude: set[int]) -> list[str]:
    """Processes of this uid (not zombies) other than `exclude`, as 'pid command'."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == os.getuid() and not status["State"].strip().startswith("Z"):
            found.append(f"{entry} {status['Name'].strip()}")
    return found


def block_user_namespaces() -> None:
    """Enter a user namespace whose limit on nested user namespaces is 0: from here on, as in a
    container that forbids them, no new user namespace can be made (the uid stays the same)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{path}", "w") as f:
            f.write(text)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")


def main(lib: str, plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    if plan.get("block_user_namespaces"):
        block_user_namespaces()
    sys.path.insert(0, lib)
    from spd_lens import sandbox

    sentinel = subprocess.Popen(["sleep", "120"])
    # Processes of this user's own session, more of them than the sandbox's process bound.
    background = [subprocess.Popen(["sleep", "120"]) for _ in range(plan.get("background_processes", 0))]
    results = {}
    for run in plan["runs"]:
        started = time.time()
        try:
            result = sandbox.run_python(run["program"], timeout=run.get("timeout", 10), **run.get("options", {}))
        except Exception as err:  # noqa: BLE001 - reported to the test, which decides
            results[run["name"]] = {"exception": type(err).__name__, "message": str(err)}
            continue
        elapsed = time.time() - started
        left = my_processes({os.getpid(), sentinel.pid, *(p.pid for p in background)})
        results[run["name"]] = {"status": result.status, "returncode": result.returncode, "seconds": elapsed,
                                "stdout": result.stdout[-2000:], "stderr": result.stderr[-2000:],
                                "isolation": result.isolation, "left": left, "sentinel_alive": sentinel.poll() is None}
    for process in [sentinel, *background]:
        process.kill()
        process.wait()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
