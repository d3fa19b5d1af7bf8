"""Running untrusted, model-written Python: one separate, limited process per program.

What each run gets (spd_lens running as root, the usual case here):

- its own process session, as a dedicated unprivileged uid (`SPD_LENS_SANDBOX_UID`, default
  64999, used by nothing else), with no supplementary groups: it cannot read root's home, write
  outside world-writable places, or lift the limits below (only root may raise a hard limit);
- a new, empty network namespace (no interfaces up: no network, not even loopback);
- limits: wall clock (`timeout`), CPU seconds, address space (`memory_mb`), process count,
  written-file size (10 MB, which also caps stdout/stderr: they go to files), open files, no core
  dumps;
- an empty environment (no inherited secrets), `python -I` (no user site, no PYTHON* variables),
  a fresh temporary working directory;
- a private mount namespace whose /tmp, /var/tmp and /dev/shm are fresh tmpfs mounts: files it
  writes there vanish with it, and nothing of the host's scratch space is visible;
- afterwards, every process left by the sandbox uid is killed (`kill(-1)` as that uid).

A pass means the program ran to its end: the harness prints a secret marker after the tests,
which it reads from a pipe before the tested code runs and keeps in a closure, so `sys.exit(0)`,
`os._exit(0)`, an exception hook or a raised `SystemExit` part way through all fail.

Not protected against: a kernel exploit; reading world-readable files (e.g. /etc, other users'
world-readable homes); code written to attack this harness itself (it runs in the same process
as the tests, so it could dig the marker out of memory, or return objects whose `__eq__` is
always true); CPU cache/timing side channels. Without root (e.g. in a container) the uid switch
is skipped and isolation is limits plus, where user namespaces are allowed, the network
namespace. For stronger isolation run the evaluation inside a VM or gVisor/firejail/nsjail
(point `SPD_LENS_SANDBOX_PYTHON` at a wrapper that execs python inside it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from spd_lens.errors import SpdLensError

SANDBOX_UID = int(os.environ.get("SPD_LENS_SANDBOX_UID", "64999"))
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
OUTPUT_LIMIT_BYTES = 10 * 2**20

# Runs first in the sandboxed interpreter: take the marker from the pipe (before any tested code
# exists), then run the program in a fresh namespace, then print the marker.
HARNESS = """\
import os, sys
def _run(fd, path):
    marker = os.read(fd, 64).decode()
    os.close(fd)
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(code, namespace)
    sys.stdout.flush()
    sys.stdout.write("\\n" + marker + "\\n")
    sys.stdout.flush()
_run(int(sys.argv[1]), sys.argv[2])
"""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed, failed, timeout or error
    returncode: int | None
    stdout: str
    stderr: str
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare(flags: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(flags) == 0


def _private_scratch() -> bool:
    """A mount namespace whose /tmp, /var/tmp and /dev/shm are fresh tmpfs, gone with the process.

    The working directory (already the cwd) stays reachable through relative paths.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing propagates to the host
        return False
    for directory in SCRATCH_DIRS:
        if os.path.isdir(directory):
            libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
    return True


def _limit_child(cpu_seconds: int, memory_bytes: int, as_root: bool, network: bool):
    def apply() -> None:
        os.setsid()
        if not network:
            # As root a network namespace needs no user namespace; otherwise try both together.
            _unshare(CLONE_NEWNET) if as_root else _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        if as_root:
            _private_scratch()
            os.setgroups([])
            os.setgid(SANDBOX_UID)
            os.setuid(SANDBOX_UID)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT_BYTES, OUTPUT_LIMIT_BYTES))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_root:  # counted per uid: only meaningful for the dedicated sandbox uid
            resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))

    return apply


@functools.cache
def network_isolation_available() -> bool:
    """Whether a child can be put in its own network namespace here."""
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=lambda: os._exit(0 if _unshare(
        CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET) else 3))
    return probe.returncode == 0


@functools.cache
def sandbox_python() -> str:
    """An interpreter the sandbox uid can execute (a root-only virtualenv path is not one).

    `$SPD_LENS_SANDBOX_PYTHON` wins; else the running interpreter, else the system `python3`.
    """
    if os.environ.get("SPD_LENS_SANDBOX_PYTHON"):
        return os.environ["SPD_LENS_SANDBOX_PYTHON"]
    if os.geteuid() != 0:
        return sys.executable
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        try:
            probe = subprocess.run([candidate, "-I", "-c", "pass"], capture_output=True, timeout=30,
                                   preexec_fn=_limit_child(5, 2**30, True, True), env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate
    raise SpdLensError(
        f"no Python interpreter is executable by the sandbox uid {SANDBOX_UID}; tried {candidates}. "
        "Install a system python3 or set SPD_LENS_SANDBOX_PYTHON to one that user can run"
    )


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 100_000,
               network: bool = False) -> SandboxResult:
    """Run `program` in the sandbox; `passed` means exit 0 after its last line ran.

    Example:
        >>> run_python("assert 1 + 1 == 2").status
        'passed'
        >>> run_python("import sys; sys.exit(0)\\nassert False").status
        'failed'
    """
    as_root = os.geteuid() == 0
    marker = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="spd_lens_sandbox_")
    read_end, write_end = os.pipe()
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        os.write(write_end, marker.encode())
        os.close(write_end)
        write_end = -1
        if as_root:
            for path in (workdir, program_path):
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
        # Relative paths: inside the sandbox /tmp is a fresh tmpfs that hides `workdir`'s path.
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        with open(os.path.join(workdir, ".stdout"), "w+b") as out, open(os.path.join(workdir, ".stderr"), "w+b") as err:
            process = subprocess.Popen(
                [sandbox_python(), "-I", "-c", HARNESS, str(read_end), "program.py"],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(read_end,),
                preexec_fn=_limit_child(int(timeout) + 1, memory_mb * 2**20, as_root, network),
            )
            os.close(read_end)
            read_end = -1
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process)
            process.wait()
            _kill_sandbox_processes(as_root)
            stdout, stderr = _read(out, max_output), _read(err, max_output)
            tail = _tail(out, 256)
        isolation = {"uid": SANDBOX_UID if as_root else os.geteuid(), "network_isolated": not network and
                     network_isolation_available()}
        if timed_out:
            return SandboxResult("timeout", None, stdout, stderr, isolation)
        if process.returncode == 0 and tail.rstrip("\n").rsplit("\n", 1)[-1] == marker:
            status = "passed"
        elif process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif process.returncode is not None and process.returncode < 0:
            status = "error"
        else:
            status = "failed"
        return SandboxResult(status, process.returncode, stdout.replace(marker, "").rstrip("\n"), stderr, isolation)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(handle, size: int) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - size))
    return handle.read().decode("utf-8", errors="replace")


def _read(handle, limit: int) -> str:
    handle.seek(0)
    return handle.read(limit).decode("utf-8", errors="replace")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_sandbox_processes(as_root: bool) -> None:
    """Kill whatever the sandbox uid still runs (processes that left the session, daemons)."""
    if not as_root:
        return
    for _ in range(3):  # a fork bomb may be mid-fork: repeat until nothing is left
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked child
            try:
                os.setgid(SANDBOX_UID)
                os.setuid(SANDBOX_UID)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
