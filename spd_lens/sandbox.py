"""Running untrusted, model-written Python: a separate process per program, with limits.

Each program runs in `python -I` in a fresh temporary directory, with an empty environment (no
inherited secrets), a wall-clock timeout, CPU-time, memory, file-size and open-file limits, in its
own session (the whole process group is killed on timeout). When spd_lens runs as root, the child
drops to the unprivileged user `nobody` before its limits are set, because root can lift them.

A program passes only if it ran to its last line: the runner appends a line that prints a random
marker, and a pass needs exit status 0 *and* that marker, so `sys.exit(0)` or `os._exit(0)` part
way through the tests is a failure.

What this does not protect against: a kernel exploit, reading world-readable files, or network
access. Issue-level hardening (namespaces) lives in `run_python(..., isolate=True)` where available.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from spd_lens.errors import SpdLensError

NOBODY_UID = 65534


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed, failed, timeout or error
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_child(cpu_seconds: int, memory_bytes: int, drop_privileges: bool):
    def apply() -> None:
        os.setsid()
        if drop_privileges:
            os.setgroups([])
            os.setgid(NOBODY_UID)
            os.setuid(NOBODY_UID)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        if drop_privileges:  # not for root: it ignores the limit, and it would count all of root's processes
            resource.setrlimit(resource.RLIMIT_NPROC, (32, 32))

    return apply


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 100_000) -> SandboxResult:
    """Run `program`; `passed` means exit 0 after its last line ran.

    Example:
        >>> run_python("assert 1 + 1 == 2").status
        'passed'
        >>> run_python("import sys; sys.exit(0)\\nassert False").status
        'failed'
    """
    marker = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="spd_lens_sandbox_")
    drop = os.geteuid() == 0
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(program + f"\n\nprint({marker!r})\n")
        if drop:
            os.chown(workdir, NOBODY_UID, NOBODY_UID)
            os.chown(script, NOBODY_UID, NOBODY_UID)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
        process = subprocess.Popen(
            [sandbox_python(), "-I", script],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_limit_child(int(timeout) + 1, memory_mb * 2**20, drop),
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            return SandboxResult("timeout", None, _text(stdout, max_output), _text(stderr, max_output))
        _kill_group(process)  # anything it left running in its session
        out = _text(stdout, max_output)
        last_line = out.strip().rsplit("\n", 1)[-1] if out.strip() else ""
        if process.returncode == 0 and last_line == marker:
            status = "passed"
        elif process.returncode is not None and process.returncode < 0:
            status = "timeout" if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else "error"
        else:
            status = "failed"
        return SandboxResult(status, process.returncode, out.replace(marker, ""), _text(stderr, max_output))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.cache
def sandbox_python() -> str:
    """An interpreter the sandbox user can execute (a root-only virtualenv path is not one).

    `$SPD_LENS_SANDBOX_PYTHON` wins; else the running interpreter, else the system `python3`.
    """
    if os.environ.get("SPD_LENS_SANDBOX_PYTHON"):
        return os.environ["SPD_LENS_SANDBOX_PYTHON"]
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    if os.geteuid() != 0:
        return sys.executable
    for candidate in candidates:
        try:
            probe = subprocess.run([candidate, "-I", "-c", "pass"], preexec_fn=_limit_child(5, 2**30, True),
                                   capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate
    raise SpdLensError(
        f"no Python interpreter is executable by the sandbox user (uid {NOBODY_UID}); tried {candidates}. "
        "Install a system python3 or set SPD_LENS_SANDBOX_PYTHON to one that user can run"
    )


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", errors="replace")
