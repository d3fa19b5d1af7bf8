"""Records for tasks that live on the Hugging Face hub: read from a local JSONL or from the hub.

A local source (`path=`) is one of:
- a directory holding `train.jsonl` / `test.jsonl` (the public splits), and `dev.jsonl` if any;
- a mapping of split to file, `{"train": "train.jsonl", "test": "test.jsonl"}` (in a config:
  `data = {train = "...", test = "..."}`), each file used whole as its split;
- one JSONL file, whose records are then divided by a hash of each record's id into test (20%),
  dev (16%) and train (64%), so they never overlap: the official test file given this way yields
  only about a fifth of its questions as `test`. Give it as `{"test": FILE}` to evaluate on all of it.

A source without a dev split of its own (no dev file, no hub validation split) has dev carved out
of its train split by a second hash (a fifth of it); its test split is untouched.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import dev_or_train, hash_split


def jsonl_lines(path: Path):
    """(line number, text) of the non-blank lines; a line that is not UTF-8 is an error naming it."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SpdLensError(f"{path}: line {line_number} is not UTF-8 text ({err.reason})") from err
            if line.strip():
                yield line_number, line


def numbered_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every record of a JSONL file; a line that does not parse, or is not
    an object, is an error naming the line."""
    records = []
    for line_number, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpdLensError(f"{path}: line {line_number} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise SpdLensError(f"{path}: line {line_number} is a {type(record).__name__}, expected a JSON object")
        records.append((line_number, record))
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a line that does not parse is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise SpdLensError(f"{str(path)!r} is not a file: pass the path of a JSONL file")
    records = [record for _, record in numbered_records(path)]
    if not records:
        raise SpdLensError(f"{path} holds no records")
    return records


LocalSource = str | Path | Mapping[str, str | Path]


def load_split(
    task: str,
    split: str,
    *,
    path: LocalSource | None,
    hub: tuple[str, str | None, dict[str, str]],
    record_key: Callable[[dict], str],
    local_split: Callable[[dict], str] | None = None,
) -> list[dict]:
    """The records of `split`, from `path` when given (see the module docstring), else from the hub.

    `hub` is (dataset id, config name, {our split: hub split}). `local_split` assigns a record of a
    single local file to a split (default: hash of `record_key`). A source without a dev split of
    its own (no hub "dev" entry, no dev file) has one carved out of its train split by a hash of
    `record_key` (`base.dev_or_train`): train and dev never share a record, test is untouched.
    """
    carve = split in ("train", "dev") and not has_own_dev(path, hub[2])
    records = _source_records(task, "train" if carve else split, path, hub, record_key, local_split)
    return [r for r in records if dev_or_train(record_key(r)) == split] if carve else records


def has_own_dev(path: LocalSource | None, hub_splits: Mapping[str, str] | None = None) -> bool:
    """Whether a data source holds a dev split itself (else dev is carved out of its train split).
    One local file is divided into all three splits by hash, so it counts as holding one."""
    if path is None:
        return hub_splits is not None and "dev" in hub_splits
    if isinstance(path, Mapping):
        return "dev" in path
    path = Path(path).expanduser()
    return not path.is_dir() or (path / "dev.jsonl").is_file()


def _source_records(task, split, path, hub, record_key, local_split) -> list[dict]:
    if path is not None:
        local = split_file(task, split, path)
        if local is not None:
            return read_jsonl(local)
        assign = local_split or (lambda record: hash_split(record_key(record)))
        return [r for r in read_jsonl(Path(path).expanduser()) if assign(r) == split]
    dataset_id, config, split_names = hub
    return hub_rows(task, dataset_id, config, split_names[split])


def split_file(task: str, split: str, path: LocalSource) -> Path | None:
    """The file that holds exactly `split` (a directory's `SPLIT.jsonl`, a mapping's entry), or
    None when `path` is one file that holds both splits."""
    if isinstance(path, Mapping):
        if split not in path:
            raise SpdLensError(f"task {task!r}: no data file is given for the {split!r} split (given: "
                               f"{sorted(path)}); add {split} = \"FILE.jsonl\" to the data table")
        return Path(path[split]).expanduser()
    path = Path(path).expanduser()
    return path / f"{split}.jsonl" if path.is_dir() else None


def describe_source(path: LocalSource | None) -> str:
    """How a task's data source is divided into splits, in words (for `spd-lens plan`)."""
    if path is None:
        return "the Hugging Face hub (published splits)"
    if isinstance(path, Mapping):
        return ", ".join(f"{split}: {file} (whole)" for split, file in sorted(path.items()))
    if Path(path).expanduser().is_dir():
        return f"{path}/train.jsonl and {path}/test.jsonl (each whole; dev.jsonl, or dev carved out of train)"
    return (f"{path}, one file divided by hash of each record's id into train/dev/test (64/16/20) (give "
            "data = {test = FILE} to use a file whole as the test split)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers from here (quickly: the hub client itself retries for
    about half a minute before it gives up)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_rows(task: str, dataset_id: str, config: str | None, hub_split: str) -> list[dict]:
    """The rows of one split of a hub dataset; an unreachable hub is an error saying what to do."""
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, config, split=hub_split)
    except Exception as err:  # the hub client raises many types when offline
        raise SpdLensError(
            f"task {task!r} could not load {dataset_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). The hub may be unreachable from this machine: download the data elsewhere and pass "
            f"local JSONL in the public format: one file per split, e.g. get_task({task!r}, path={{'train': "
            f"'data/{task}/train.jsonl', 'test': 'data/{task}/test.jsonl'}}) or `--data train=FILE --data "
            f"test=FILE` on the CLI, a directory holding train.jsonl and test.jsonl, or one file, which is "
            f"then divided 80/20 into train and test"
        ) from err
    return [dict(row) for row in rows]


def require_fields(task: str, record: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise SpdLensError(
            f"task {task!r}: a record lacks the field(s) {missing} (it has {sorted(record)}); "
            "use the task's public JSONL format"
        )
