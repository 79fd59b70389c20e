"""Reading a fine-tuning data file: records, each remembering where in the file it came from.

Formats: a JSON list of objects, JSON lines (one object per line), CSV or TSV
with a header row (or without one, when the columns are named by number).
Every error names the file and the line (or, in a JSON list, the record), so a
bad record in a file of thousands is found at once.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


@dataclass
class Records:
    """The records of one file, in file order, with where each one is ("line 7", "record 3")."""

    path: Path
    items: list[dict[str, Any]]
    where: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def error(self, index: int, message: str) -> ValueError:
        """An error about record `index`, naming the file and its place in it."""
        return ValueError(f"{self.path}: {self.where[index]}: {message}")

    def subset(self, indices: Sequence[int]) -> "Records":
        """The records `indices`, in that order, keeping their places."""
        return Records(self.path, [self.items[i] for i in indices], [self.where[i] for i in indices])

    def split(self, val_fraction: float, seed: int) -> tuple["Records", "Records"]:
        """(train, val): a seeded shuffle, then the last `val_fraction` of it for validation,
        so that a file sorted by label still gives both splits every label."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(len(self) * val_fraction))
        if n_val >= len(self):
            raise ValueError(f"{self.path}: {len(self)} records are too few to keep {val_fraction:.0%} "
                             f"for validation and train on the rest")
        return self.subset(order[:-n_val]), self.subset(order[-n_val:])


def train_val_records(load: Callable[[str | os.PathLike], Records], data: str | os.PathLike,
                      val_data: str | os.PathLike | None, val_fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, val): `load(data)` and `load(val_data)`, or a seeded split of `load(data)`."""
    records = load(data)
    if val_data is not None:
        return records, load(val_data)
    return records.split(val_fraction, seed)


def read_text(path: Path) -> str:
    """A data file's UTF-8 text; errors name the file (and the offending byte)."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_records(path: str | os.PathLike, header: bool = True) -> Records:
    """The records of a JSON list, JSON lines, CSV or TSV file (by suffix: .csv, .tsv, .tab;
    anything else is JSON). Without `header`, CSV/TSV columns are named "0", "1", ..."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() in DELIMITERS:
        records = _read_table(path, text, DELIMITERS[path.suffix.lower()], header)
    elif text.lstrip().startswith("["):
        records = _read_json_list(path, text)
    else:
        records = _read_json_lines(path, text)
    if not records.items:
        raise ValueError(f"{path}: holds no records")
    return records


def _read_json_list(path: Path, text: str) -> Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON file must hold a list of records (or be JSON lines)")
    where = [f"record {i + 1}" for i in range(len(data))]
    records = Records(path, data, where)
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise records.error(i, f"a record must be a JSON object, got {type(item).__name__}")
    return records


def _read_json_lines(path: Path, text: str) -> Records:
    items, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {number}: malformed JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}: line {number}: a record must be a JSON object, got {type(item).__name__}")
        items.append(item)
        where.append(f"line {number}")
    return Records(path, items, where)


def _read_table(path: Path, text: str, delimiter: str, header: bool) -> Records:
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    rows = iter(reader)
    try:
        names = next(rows) if header else None
    except StopIteration:
        return Records(path, [], [])
    except csv.Error as exc:
        raise ValueError(f"{path}: line {reader.line_num}: malformed {path.suffix[1:].upper()}: {exc}") from None
    items, where = [], []
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"{path}: line {reader.line_num}: malformed {path.suffix[1:].upper()}: {exc}") from None
        if not any(cell.strip() for cell in row):
            continue
        columns = names if names is not None else [str(i) for i in range(len(row))]
        items.append(dict(zip(columns, row)))  # a short row lacks its last columns: reported as missing
        where.append(f"line {reader.line_num}")
    return Records(path, items, where)


ON_LONG = ("truncate", "refuse")


def long_records(records: Records, lengths: Sequence[int], limit: int, on_long: str) -> list[str]:
    """Check the token count of each record against `limit`: with on_long="refuse" any longer
    record is an error naming the first few; with "truncate" they are described in the returned
    lines (empty when every record fits), for the caller to report."""
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    long = [i for i, n in enumerate(lengths) if n > limit]
    if not long:
        return []
    head = f"{records.path}: {len(long)} of {len(records)} records are longer than the context of {limit} tokens"
    if on_long == "refuse":
        shown = ", ".join(f"{records.where[i]}: {lengths[i]} tokens" for i in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        raise ValueError(f"{head} ({shown}{more}); shorten them, raise --context-length "
                         f"or pass --on-long truncate")
    return [f"{head} (longest {max(lengths[i] for i in long)}): truncated to it"]
