"""Running untrusted, model-written Python: one separate, isolated, limited process per program.

Every run gets its own mount, PID and network namespaces (`spd_lens/sandbox_init.py` builds them):

- **as root**: the program runs as a dedicated unprivileged uid (`SPD_LENS_SANDBOX_UID`, default
  64999, used by nothing else) with no supplementary groups;
- **as any other user**, where unprivileged user namespaces are allowed (most Linux distributions):
  in a new user namespace too, as the invoking uid, with no capability left once it runs;
- the whole file system it sees is read-only (a recursive read-only bind of `/`), except private
  tmpfs for /tmp, /var/tmp, /dev/shm and /run and one fresh tmpfs working directory (64 MB each,
  gone with the run: nothing it writes reaches the host's disk); /dev holds only null, zero, full,
  random and urandom; /proc is a new one that shows only the run's own processes;
- it is PID 1's child in its own PID namespace: when it ends, every process it left is killed,
  daemons included; the run also dies with the process that started it;
- no network (an empty network namespace: not even loopback);
- limits: wall clock (`timeout`), CPU seconds, address space (`memory_mb`), written-file size
  (10 MB, which also caps stdout/stderr), 64 open files, no core dumps, and 64 processes. The
  process bound is RLIMIT_NPROC, which the kernel counts per user *and user namespace* (Linux
  5.14 and later): as root it counts the sandbox uid's processes, as another user the processes
  in the run's own user namespace, so a fork bomb stops at 64 while the user's own session (counted
  in the parent namespace) is untouched. (A delegated cgroup would also bound it, but needs a
  systemd scope or a writable cgroup tree; the namespaced limit needs nothing);
- an empty environment (no inherited secrets), `python -I` (no user site, no PYTHON* variables).

`strict=True` goes further: the file system is an empty tmpfs holding only the interpreter's
installation (its prefixes, read-only), the system's shared libraries (/usr/lib, /lib*), the
working directory and the scratch directories above: nothing of $HOME, /etc, /var, /opt, /srv or
other mounts. Without it a run can *read* whatever the invoking user can (world-readable files and,
as a non-root user, the user's own files such as `~/.ssh`), though it can change none of them.

`backend="bwrap"` builds the same view with bubblewrap where it is installed (non-root runs; a
root run always takes the built-in path). Where neither root nor user namespaces are available
(some containers forbid them), running refuses with `SandboxUnavailable`, unless
`allow_unsafe=True`: then the program runs with only the limits, an empty environment and a
fresh directory (and, as root, the dedicated uid), and its `isolation` says `"mode": "unsafe"`.

A pass means the program ran to its end: the harness prints a secret marker after the tests,
which it reads from a pipe before the tested code runs and keeps in a closure, so `sys.exit(0)`,
`os._exit(0)`, an exception hook or a raised `SystemExit` part way through all fail.

Not protected against: a kernel exploit; code written to attack this harness itself (it runs in
the same process as the tests, so it could dig the marker out of memory, or return objects whose
`__eq__` is always true); CPU cache/timing side channels; named Unix sockets the user can reach
outside /run and /tmp (e.g. in the home directory: use `strict`). For stronger isolation run the
evaluation inside a VM or gVisor (point `SPD_LENS_SANDBOX_PYTHON` at a wrapper that execs python
inside it).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from spd_lens.errors import SpdLensError

SANDBOX_UID = int(os.environ.get("SPD_LENS_SANDBOX_UID", "64999"))
OUTPUT_LIMIT_BYTES = 10 * 2**20
OPEN_FILES = 64
PROCESSES = 64
SETUP_FAILED = 125  # sandbox_init's exit status when it could not build the sandbox
BACKENDS = ("builtin", "bwrap")
INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
# What `strict` shows besides the interpreter's own prefixes: the system's shared libraries.
LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")

# Runs first in the sandboxed interpreter: take the marker from the pipe (before any tested code
# exists) and set the limits; fork: the parent only reaps (as PID 1 of the run's PID namespace its
# exit ends every process left), the child runs the program in a fresh namespace, then prints the
# marker.
HARNESS = """\
import os, resource, sys
def _run(fd, path, limits):
    marker = os.read(fd, 64).decode()
    os.close(fd)
    for item in limits.split(","):
        name, value = item.split("=")
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    child = os.fork()
    while child:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(code, namespace)
    sys.stdout.flush()
    sys.stdout.write("\\n" + marker + "\\n")
    sys.stdout.flush()
_run(int(sys.argv[1]), sys.argv[2], sys.argv[3])
"""


class SandboxUnavailable(SpdLensError):
    """No isolation is possible here and unsafe runs were not allowed."""


@dataclass(frozen=True)
class SandboxOptions:
    """How code is run (a config's `[sandbox]`): `strict` hides everything but the interpreter and
    the working directory; `unsafe` runs without isolation where none is possible (recorded);
    `backend` "builtin" or "bwrap"."""

    strict: bool = False
    unsafe: bool = False
    backend: str = "builtin"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SpdLensError(f"unknown sandbox backend {self.backend!r}: use one of {list(BACKENDS)}")


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


@functools.cache
def sandbox_python() -> str:
    """An interpreter the program's uid can execute (a root-only virtualenv path is not one).

    `$SPD_LENS_SANDBOX_PYTHON` wins; else the running interpreter, else (as root, for the sandbox
    uid) the system `python3`.
    """
    if os.environ.get("SPD_LENS_SANDBOX_PYTHON"):
        return os.environ["SPD_LENS_SANDBOX_PYTHON"]
    if os.geteuid() != 0:
        return sys.executable
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        try:
            probe = subprocess.run([candidate, "-I", "-c", "pass"], capture_output=True, timeout=30, cwd="/",
                                   user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[], env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate
    raise SpdLensError(
        f"no Python interpreter is executable by the sandbox uid {SANDBOX_UID}; tried {candidates}. "
        "Install a system python3 or set SPD_LENS_SANDBOX_PYTHON to one that user can run"
    )


@functools.cache
def _interpreter_paths(python: str) -> tuple[str, ...]:
    """What `strict` binds read-only: the interpreter's prefixes and the system's shared libraries."""
    script = "import sys; print('\\n'.join([sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]))"
    out = subprocess.run([python, "-I", "-c", script], capture_output=True, text=True, timeout=30, check=True).stdout
    paths = {os.path.realpath(p) for p in out.split()} | {os.path.dirname(os.path.realpath(python))}
    paths |= {d for d in LIBRARY_DIRS if os.path.lexists(d)}
    # A path inside another is already visible through it.
    return tuple(p for p in sorted(paths) if not any(p.startswith(q.rstrip("/") + "/") for q in paths if q != p))


def _limits(mode: str, timeout: float, memory_mb: int) -> dict[str, int]:
    limits = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_FSIZE": OUTPUT_LIMIT_BYTES,
              "RLIMIT_NOFILE": OPEN_FILES, "RLIMIT_CORE": 0}
    # Counted per uid and user namespace: the sandbox uid's (root), the run's own namespace's
    # (user namespaces). Without either, it would count the user's whole session: no bound.
    if mode != "unsafe" or os.geteuid() == 0:
        limits["RLIMIT_NPROC"] = PROCESSES
    return limits


def _bwrap_command(python: str, strict: bool, network: bool, workdir: str, program_fd: int, info_fd: int) -> list[str]:
    command = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--as-pid-1",
               "--info-fd", str(info_fd)]
    if not network:
        command.append("--unshare-net")
    if strict:
        for path in _interpreter_paths(python):
            command += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
        command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    else:
        command += ["--ro-bind", "/", "/"]
    command += ["--dev", "/dev", "--proc", "/proc"]
    for directory in ("/tmp", "/var/tmp", "/run", "/dev/shm"):
        if strict or (os.path.isdir(directory) and not os.path.islink(directory)):
            command += ["--size", str(64 * 2**20), "--tmpfs", directory]
    command += ["--perms", "0700", "--size", str(64 * 2**20), "--tmpfs", workdir,
                "--file", str(program_fd), os.path.join(workdir, "program.py"), "--chdir", workdir]
    if strict:
        command += ["--remount-ro", "/"]
    return command


def _execute(program: str, mode: str, *, strict: bool, timeout: float, memory_mb: int, max_output: int,
             network: bool) -> SandboxResult:
    """One run in `mode`: root, user-namespaces, bubblewrap or unsafe."""
    as_root = os.geteuid() == 0
    program_uid = SANDBOX_UID if as_root and mode in ("root", "unsafe") else os.geteuid()
    if program_uid == SANDBOX_UID:
        python = sandbox_python()
    else:
        python = os.environ.get("SPD_LENS_SANDBOX_PYTHON") or sys.executable
    if strict and mode != "unsafe":
        python = os.path.join(os.path.realpath(os.path.dirname(python)), os.path.basename(python))
    limits = _limits(mode, timeout, memory_mb)
    marker = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="spd_lens_sandbox_")
    opened: list[int] = []
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        marker_read, marker_write = os.pipe()
        report_read, report_write = os.pipe()
        opened += [marker_read, marker_write, report_read, report_write]
        os.write(marker_write, marker.encode())
        argv = [python, "-I", "-c", HARNESS, str(marker_read), "program.py",
                ",".join(f"{name}={value}" for name, value in limits.items())]
        if mode == "bubblewrap":
            program_fd = os.open(program_path, os.O_RDONLY)
            opened.append(program_fd)
            passed_fds = [marker_read, program_fd, report_write]
            command = _bwrap_command(python, strict, network, workdir, program_fd, report_write) + ["--", *argv]
        else:
            spec = {"mode": {"root": "root", "user-namespaces": "user"}.get(mode, "none"), "network": network,
                    "strict": strict, "workdir": workdir, "uid": program_uid if program_uid == SANDBOX_UID else None,
                    "visible": list(_interpreter_paths(python)) if strict and mode != "unsafe" else [],
                    "argv": argv, "report_fd": report_write}
            command = [sys.executable, "-I", "-S", INIT, json.dumps(spec)]
            passed_fds = [marker_read, report_write]
            if as_root and program_uid == SANDBOX_UID:
                os.chown(workdir, SANDBOX_UID, SANDBOX_UID)  # the unsafe path runs in this directory itself
                os.chown(program_path, SANDBOX_UID, SANDBOX_UID)
        # Relative paths: inside the sandbox /tmp is a fresh tmpfs.
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        # Output goes to unnamed files: nothing inside the sandbox can reach them but its own stdout/stderr.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       pass_fds=passed_fds, start_new_session=True)
            for fd in (marker_read, marker_write, report_write):
                os.close(fd)
                opened.remove(fd)
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _end_run(process, mode, report_read)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(process)  # the unsafe path and bwrap leave the rest to the process group
            process.wait()
            if mode == "unsafe" and program_uid == SANDBOX_UID:
                _kill_sandbox_processes()
            setup = "" if mode == "bubblewrap" else os.read(report_read, 4096).decode(errors="replace")
            stdout, stderr = _read(out, max_output), _read(err, max_output)
            tail = _tail(out, 256)
        returncode = process.returncode
        if mode == "bubblewrap" and returncode > 128:  # bwrap reports a signal as 128 + N
            returncode = 128 - returncode
        isolation = _isolation(mode, strict, network, program_uid, limits, setup)
        if mode != "bubblewrap" and not setup and not timed_out:
            return SandboxResult("error", returncode, stdout, stderr or "the sandbox was not set up", isolation)
        if timed_out:
            return SandboxResult("timeout", None, stdout, stderr, isolation)
        if returncode == 0 and tail.rstrip("\n").rsplit("\n", 1)[-1] == marker:
            status = "passed"
        elif returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif returncode < 0:
            status = "error"
        else:
            status = "failed"
        return SandboxResult(status, returncode, stdout.replace(marker, "").rstrip("\n"), stderr, isolation)
    finally:
        for fd in opened:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _isolation(mode: str, strict: bool, network: bool, uid: int, limits: dict[str, int], setup: str) -> dict:
    """What one run had: which uid, namespaces, file system view and limits."""
    isolated = mode != "unsafe"
    namespaces = (["user"] if mode in ("user-namespaces", "bubblewrap") else []) + (
        ["mount", "pid"] + ([] if network else ["network"]) if isolated else [])
    try:
        notes = json.loads(setup) if setup else {}
    except json.JSONDecodeError:
        notes = {}
    return {
        "mode": mode, "uid": uid, "namespaces": namespaces, "read_only_root": isolated, "strict": strict and isolated,
        "network": network or not isolated, **({"proc": notes["proc"]} if "proc" in notes else {}),
        "limits": {"cpu_seconds": limits["RLIMIT_CPU"], "memory_mb": limits["RLIMIT_AS"] // 2**20,
                   "file_size_mb": limits["RLIMIT_FSIZE"] // 2**20, "open_files": limits["RLIMIT_NOFILE"],
                   "processes": limits.get("RLIMIT_NPROC")},
    }


@functools.cache
def _probe(mode: str, strict: bool) -> str | None:
    """None where a trivial program runs in `mode`; else why not (cached: once per process)."""
    try:
        result = _execute("pass", mode, strict=strict, timeout=30, memory_mb=1024, max_output=2000, network=False)
    except (OSError, subprocess.SubprocessError, SpdLensError) as err:
        return str(err)
    if result.passed:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"a trivial program ended with status {result.status} ({result.returncode})"


def isolation_mode(*, strict: bool = False, backend: str = "builtin", allow_unsafe: bool = False) -> str:
    """How programs run here: "root", "user-namespaces", "bubblewrap", or "unsafe" (only with
    `allow_unsafe`); raises `SandboxUnavailable` saying why and what to do where none works.

    Example:
        >>> isolation_mode() in ("root", "user-namespaces")
        True
    """
    SandboxOptions(strict, allow_unsafe, backend)  # checks the backend's name
    candidates = ["root"] if os.geteuid() == 0 else []
    if backend == "bwrap" and os.geteuid() != 0:
        if shutil.which("bwrap") is None:
            raise SpdLensError("the sandbox backend 'bwrap' was asked for, but no `bwrap` is on PATH: install "
                               "bubblewrap or use the built-in backend")
        candidates.append("bubblewrap")
    else:
        candidates.append("user-namespaces")
    reasons = []
    for mode in candidates:
        reason = _probe(mode, strict)
        if reason is None:
            return mode
        reasons.append(f"{mode}: {reason}")
    if allow_unsafe:
        return "unsafe"
    raise SandboxUnavailable(
        "refusing to run model-written code: no isolation is possible here (" + "; ".join(reasons) + "). Run as "
        "root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and "
        "user.max_user_namespaces > 0; in a container, a runtime or seccomp profile that permits unshare), or "
        "score inside a throwaway VM/container and pass --unsafe-sandbox (a config's [sandbox] unsafe = true) "
        "to run it with only resource limits; the run's metrics then record \"unsafe\""
    )


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 100_000,
               network: bool = False, strict: bool = False, allow_unsafe: bool = False,
               backend: str = "builtin") -> SandboxResult:
    """Run `program` in the sandbox; `passed` means exit 0 after its last line ran. `isolation`
    says what the run had (mode, uid, namespaces, read-only root, strict, limits).

    Example:
        >>> run_python("assert 1 + 1 == 2").status
        'passed'
        >>> run_python("import sys; sys.exit(0)\\nassert False").status
        'failed'
        >>> run_python("pass").isolation["read_only_root"]
        True
    """
    mode = isolation_mode(strict=strict, backend=backend, allow_unsafe=allow_unsafe)
    return _execute(program, mode, strict=strict, timeout=timeout, memory_mb=memory_mb, max_output=max_output,
                    network=network)


def summarise_isolation(records: Iterable[dict]) -> dict | None:
    """One summary of the isolation of many runs (the `sandbox` of per-example results): how many
    had each mode, how many were unsafe, and each distinct isolation. None when no code ran."""
    isolations = [r["sandbox"] for r in records if isinstance(r.get("sandbox"), dict)]
    if not isolations:
        return None
    distinct = []
    for isolation in isolations:
        if isolation not in distinct:
            distinct.append(isolation)
    modes = Counter(i.get("mode") for i in isolations)
    return {"runs": len(isolations), "modes": dict(modes.most_common()), "unsafe_runs": modes.get("unsafe", 0),
            "isolation": distinct}


def describe_isolation(summary: dict | None) -> str:
    """A line for reports: the modes the code ran in, and a warning when some ran unsafe."""
    if not summary:
        return ""
    modes = ", ".join(f"{mode} {count}" for mode, count in summary["modes"].items())
    warning = (f"  WARNING: {summary['unsafe_runs']} run(s) without isolation (--unsafe-sandbox)"
               if summary.get("unsafe_runs") else "")
    strict = "  strict" if all(i.get("strict") for i in summary["isolation"]) else ""
    return f"code sandbox: {modes} (runs by mode){strict}{warning}"


def _tail(handle, size: int) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - size))
    return handle.read().decode("utf-8", errors="replace")


def _read(handle, limit: int) -> str:
    handle.seek(0)
    return handle.read(limit).decode("utf-8", errors="replace")


def _end_run(process: subprocess.Popen, mode: str, report_read: int) -> None:
    """Kill the run's PID 1 (the kernel then kills the rest of its namespace); the process started
    (sandbox_init, bwrap) waits for that to finish and then exits."""
    if mode != "bubblewrap":
        process.terminate()  # sandbox_init's cue to kill its PID 1
        return
    os.set_blocking(report_read, False)
    try:  # bwrap's --info-fd: {"child-pid": host pid of the namespace's PID 1, ...}
        info, _ = json.JSONDecoder().raw_decode(os.read(report_read, 4096).decode())
        os.kill(int(info["child-pid"]), signal.SIGKILL)
    except (OSError, ValueError, KeyError, TypeError):
        process.terminate()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_sandbox_processes() -> None:
    """Without a PID namespace (the unsafe path as root): kill whatever the sandbox uid still runs."""
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
