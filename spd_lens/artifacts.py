"""Writing and reading artifacts safely: atomic writes, hashes, JSON objects with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spd_lens.errors import SpdLensError


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary sibling, then rename it over `path` (never half-written)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; artifacts are ordinary files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically, creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; anything else is an error naming the file and what it should be."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpdLensError(f"{path} is not a readable JSON file ({err}); it should hold {what}") from err
    if not isinstance(data, dict):
        raise SpdLensError(f"{path} holds a {type(data).__name__}, not the JSON object of {what}")
    return data


def canonical(settings):
    """Settings as JSON gives them back (tuples become lists, keys strings, other objects their
    `str`): the one form settings are compared in, so what is read from a file equals what is in
    memory.

    Example:
        >>> canonical({"layers": (15, 29), "heads": None}) == canonical({"layers": [15, 29], "heads": None})
        True
    """
    return json.loads(json.dumps(settings, default=str))


def settings_differences(old: dict, new: dict, *, recorded: str = "file has") -> list[str]:
    """Each setting that differs between recorded settings `old` and current ones `new`, as
    `"name: file has X, now Y"`; nested tables are compared key by key (`projection.alpha: ...`).
    Both are compared in `canonical` form."""
    differences: list[str] = []

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            # prefix ends with exactly one separator; a key may itself end in "." (keep it)
            differences.append(f"{prefix[:-1]}: {recorded} {a!r}, now {b!r}")

    walk(canonical(old), canonical(new), "")
    return differences


def check_same_settings(old: dict, new: dict, what: str, fix: str, *, recorded: str = "file has") -> None:
    """Refuse (naming every setting that differs) unless `old` and `new` are the same settings."""
    differences = settings_differences(old, new, recorded=recorded)
    if differences:
        raise SpdLensError(f"{what} was made with other settings; refusing to mix ({'; '.join(differences)}). {fix}")


def read_stage_seconds(directory: str | Path) -> dict[str, dict[str, float]]:
    """Wall-clock seconds per stage over every call that did work on a run directory:
    {"completed": {...}, "interrupted": {...}} (empty when it records none)."""
    directory = Path(directory)
    path = directory / "stage_seconds.json"
    recorded = read_json_object(path, "seconds per stage") if path.is_file() else {}
    if not path.is_file() and (directory / "metrics.json").is_file():  # run directories from before the file
        recorded = read_json_object(directory / "metrics.json", "a run's metrics").get("stage_seconds", {})
    if recorded and "completed" not in recorded:  # the older flat layout: every call counted as completed
        recorded = {"completed": recorded}
    return {"completed": {k: float(v) for k, v in recorded.get("completed", {}).items()},
            "interrupted": {k: float(v) for k, v in recorded.get("interrupted", {}).items()}}


LOCK_NAME = ".spd-lens.lock"


@contextmanager
def exclusive(directory: str | Path, command: str) -> Iterator[None]:
    """Hold `directory` for one process while it writes there: a second `spd-lens run` or `ablate`
    on the same directory (started twice by mistake, or from two lanes) is refused at once instead
    of both writing the same files. The lock is the kernel's (flock): it ends with the process,
    however the process ends, so a killed run never leaves a directory locked."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SpdLensError(f"{directory} is being written by another spd-lens process ({command} on the same "
                           "directory); wait for it to finish (it resumes nothing of yours), or pass another --out") from None
    try:
        yield
    finally:
        lock.release()
