"""The first process of a sandbox run: new namespaces, the file system the program sees, then the
harness. Run as a script by `spd_lens.sandbox` (`python -I -S sandbox_init.py SPEC_JSON`), so it
uses the standard library only and imports nothing of spd_lens.

What it does, in order (SPEC_JSON keys in brackets):

1. `unshare` a mount, PID and (unless [network]) network namespace; with [mode] "user" a user
   namespace too, in which the invoking uid maps to itself (or to a non-zero uid for a root
   without privileges), so the program keeps no capability once it execs.
2. Forks: the child is PID 1 of the new PID namespace; this process waits for it and exits with
   its status. When PID 1 exits the kernel kills everything left in the namespace; PID 1 and this
   process die with their parent (`PR_SET_PDEATHSIG`).
3. PID 1 builds the new root on a mount stacked over the working directory [workdir]: either the
   whole file system read-only (recursive bind of `/`), or with [strict] an empty tmpfs holding
   read-only binds of [visible] only; then private tmpfs for /tmp, /var/tmp, /dev/shm and /run, a
   minimal /dev, a fresh /proc for the PID namespace, and a fresh tmpfs at [workdir] holding a copy
   of the files staged there. `pivot_root` into it and detach the old root.
4. With [mode] "root", drops to [uid] (no supplementary groups); sets `no_new_privs`; execs [argv].

[mode] "none" (the explicitly unsafe path) only drops to [uid] when given and execs [argv].
Failures print `spd_lens sandbox setup: ...` on stderr and exit with SETUP_FAILED.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import resource
import shutil
import signal
import sys

SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 18, 1 << 21, 1 << 24
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 2, -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Per-architecture syscall numbers (mount_setattr is 442 wherever it exists).
SYSCALLS = {"x86_64": {"pivot_root": 155, "mount_setattr": 442}, "aarch64": {"pivot_root": 41, "mount_setattr": 442}}
SCRATCH = ("tmp", "var/tmp", "run")
DEVICES = ("null", "zero", "full", "random", "urandom")
# Per-mount options that a read-only remount must keep (a user namespace may not drop them).
KEPT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
                "nosymfollow": 256}

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SetupError(f"{what} failed: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = (lambda s: None if s is None else s.encode())
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def syscall_number(name: str) -> int | None:
    return SYSCALLS.get(platform.machine(), {}).get(name)


def read_only(path: str, *, recursive: bool, legacy: bool = False) -> None:
    """Make the mount at `path` (and with `recursive` every mount below it) read-only."""
    number = syscall_number("mount_setattr")
    if number is not None and not legacy:
        attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        if libc.syscall(number, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0, ctypes.byref(attr),
                        ctypes.sizeof(attr)) == 0:
            return
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            check(-1, f"mount_setattr read-only {path}")
    # Kernels before 5.12: remount each mount read-only, keeping its per-mount options.
    for target, options in mounts_under(path, recursive):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= KEPT_OPTIONS.get(option, 0)
        mount(None, target, None, flags)


def mounts_under(path: str, recursive: bool) -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of the mounts at `path` (and below), parents first."""
    path = path.rstrip("/") or "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # Mount points escape spaces, tabs, newlines and backslashes as octal.
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            inside = target == path or (recursive and target.startswith(path.rstrip("/") + "/"))
            if inside:
                found.append((target, fields[5].split(",")))
    return found


def make_dirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def bind(source: str, target: str, *, recursive: bool = True) -> None:
    if os.path.isdir(source):
        make_dirs(target)
    else:
        make_dirs(os.path.dirname(target))
        if not os.path.exists(target):
            open(target, "w").close()
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def minimal_dev(root: str) -> None:
    """A tmpfs /dev with only the harmless character devices (no disks, no terminals)."""
    dev = root + "/dev"
    make_dirs(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=1m,mode=0755")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            bind("/dev/" + name, f"{dev}/{name}", recursive=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    make_dirs(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")


def build_root(spec: dict, root: str, staged: str) -> dict:
    """The file system the program sees, built at `root`; returns what it had to settle for."""
    notes = {}
    legacy = spec.get("legacy_remount", False)
    if spec["strict"]:
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path in spec["visible"]:
            if not os.path.lexists(path):
                continue
            if os.path.islink(path):  # e.g. /lib -> usr/lib on a merged /usr
                make_dirs(os.path.dirname(root + path))
                os.symlink(os.readlink(path), root + path)
                continue
            bind(path, root + path)
            read_only(root + path, recursive=True, legacy=legacy)
    else:
        mount("/", root, None, MS_BIND | MS_REC)
        read_only(root, recursive=True, legacy=legacy)
    for directory in SCRATCH:
        target = f"{root}/{directory}"
        if spec["strict"]:
            make_dirs(target)
        # A symbolic link would resolve against the host's root, not the new one: leave it be.
        if os.path.isdir(target) and not os.path.islink(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    minimal_dev(root)
    make_dirs(root + "/proc")
    try:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes["proc"] = "own"
    except SetupError:  # a container that masks parts of its /proc refuses a new one: hide it instead
        mount("tmpfs", root + "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1k,mode=0555")
        notes["proc"] = "hidden"
    # The working directory: a fresh tmpfs (bounded, nothing reaches the host's disk) at its own path.
    workdir = root + spec["workdir"]
    make_dirs(workdir, 0o700)
    owner = f",uid={spec['uid']},gid={spec['uid']}" if spec["mode"] == "root" else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size=64m,mode=0700{owner}")
    for name in os.listdir(staged):
        shutil.copyfile(f"{staged}/{name}", f"{workdir}/{name}")
        if spec["mode"] == "root":
            os.chown(f"{workdir}/{name}", spec["uid"], spec["uid"])
    if spec["strict"]:
        for path in ("/etc/ld.so.cache",):  # the loader finds the interpreter's libraries faster
            if os.path.isfile(path):
                bind(path, root + path, recursive=False)
                read_only(root + path, recursive=False, legacy=legacy)
        read_only(root, recursive=False, legacy=legacy)
    return notes


def enter_root(root: str) -> str:
    os.chdir(root)
    number = syscall_number("pivot_root")
    if number is not None and libc.syscall(number, b".", b".") == 0:
        check(libc.umount2(b".", MNT_DETACH), "detach the old root")
        method = "pivot_root"
    else:  # no pivot_root (an initramfs root, an unknown architecture): chroot, which no user namespace can leave
        check(libc.chroot(b"."), "chroot")
        method = "chroot"
    os.chdir("/")
    return method


def map_ids(uid: int, gid: int) -> None:
    inside = uid if uid != 0 else 64999  # a root without privileges must not become root inside
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inside} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inside if gid == 0 else gid} {gid} 1")


def drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def relay(child: int) -> None:
    """Wait for PID 1 and exit as it did; 128 + N from PID 1 means its program died of signal N.

    SIGTERM (the parent's timeout) kills PID 1; the wait returns once the kernel has killed and
    reaped every process of the namespace, so the run is wholly over when this process ends.
    """
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    signal_number = -code if code < 0 else code - 128 if code > 128 else 0
    if 0 < signal_number < signal.NSIG and signal_number != signal.SIGSTOP:
        if signal_number != signal.SIGKILL:
            signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)  # ends here unless the signal's default is to ignore it
    os._exit(code if 0 <= code < 256 else SETUP_FAILED)


def report(spec: dict, notes: dict) -> None:
    """Tell the parent that the sandbox is set up, and what it settled for (the fd closes before exec)."""
    fd = spec.get("report_fd")
    if fd is not None:
        os.write(fd, json.dumps(notes).encode())
        os.close(fd)


def main(spec: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if spec["mode"] == "none":
        if spec.get("uid") is not None:
            drop_to(spec["uid"])
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        report(spec, {})
        os.execv(spec["argv"][0], spec["argv"])
    flags = CLONE_NEWNS | CLONE_NEWPID | (0 if spec["network"] else CLONE_NEWNET)
    if spec["mode"] == "user":
        flags |= CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()  # read before: in the new namespace they are unmapped until mapped
    check(libc.unshare(flags), "unshare of the " + ("user, " if spec["mode"] == "user" else "") + "mount, PID "
          "and network namespaces")
    if spec["mode"] == "user":
        map_ids(uid, gid)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates back to the host
    staged = os.open(".", os.O_PATH | os.O_DIRECTORY)
    child = os.fork()
    if child:
        relay(child)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    root = spec["workdir"]  # the new root is stacked over the staging directory, then pivoted into
    notes = build_root(spec, root, f"/proc/self/fd/{staged}")
    os.close(staged)
    notes["root"] = enter_root(root)
    os.chdir(spec["workdir"])
    if spec["mode"] == "root":
        drop_to(spec["uid"])
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a change of uid clears it
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    report(spec, notes)
    os.execv(spec["argv"][0], spec["argv"])


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (SetupError, OSError) as err:
        print(f"spd_lens sandbox setup: {err}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
