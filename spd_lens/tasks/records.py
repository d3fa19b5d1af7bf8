"""Records for tasks that live on the Hugging Face hub: read from a local JSONL or from the hub.

A local source is either a directory holding `train.jsonl` / `test.jsonl` (the public splits), or
one JSONL file, whose records are then assigned to train or test by a hash of their id (so the
two never overlap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import hash_split


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


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a line that does not parse is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise SpdLensError(f"{str(path)!r} is not a file: pass the path of a JSONL file")
    records = []
    for line_number, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpdLensError(f"{path}: line {line_number} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise SpdLensError(f"{path}: line {line_number} is a {type(record).__name__}, expected a JSON object")
        records.append(record)
    if not records:
        raise SpdLensError(f"{path} holds no records")
    return records


def load_split(
    task: str,
    split: str,
    *,
    path: str | Path | None,
    hub: tuple[str, str | None, dict[str, str]],
    record_key: Callable[[dict], str],
    local_split: Callable[[dict], str] | None = None,
) -> list[dict]:
    """The records of `split`, from `path` when given, else from the hub.

    `hub` is (dataset id, config name, {our split: hub split}). `local_split` assigns a record of a
    single local file to a split (default: hash of `record_key`).
    """
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            return read_jsonl(path / f"{split}.jsonl")
        assign = local_split or (lambda record: hash_split(record_key(record)))
        return [r for r in read_jsonl(path) if assign(r) == split]
    dataset_id, config, split_names = hub
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, config, split=split_names[split])
    except Exception as err:  # the hub client raises many types when offline
        raise SpdLensError(
            f"task {task!r} could not load {dataset_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). The hub may be unreachable from this machine: download the data elsewhere and pass "
            f"a local JSONL file (or a directory with train.jsonl and test.jsonl) in the public format, "
            f"e.g. get_task({task!r}, path='data/{task}.jsonl') or `--data data/{task}.jsonl` on the CLI"
        ) from err
    return [dict(row) for row in rows]


def require_fields(task: str, record: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise SpdLensError(
            f"task {task!r}: a record lacks the field(s) {missing} (it has {sorted(record)}); "
            "use the task's public JSONL format"
        )
