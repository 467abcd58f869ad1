"""Atomic file writes (a reader sees the old content or the new, never part of it) and CSV reading."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that a reader sees the old content or the new, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file`, atomically (see `write_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


_CSV_FIELD_LIMIT = 2**31 - 1


def csv_rows(lines: Iterable[str], source: str) -> list[dict]:
    """csv.DictReader's rows of `lines` (a text file or a list of lines); a malformed file is one line naming
    `source`. Fields may be long (a pasted document as a prompt): the csv module's 128 KiB cap is lifted."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        return list(csv.DictReader(lines))
    except csv.Error as e:
        raise ValueError(f"{source}: not a readable CSV file ({e})") from None


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; anything else (bad JSON, bad UTF-8, a list) is one line naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e  # --debug shows the parser's error
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not {what} (a JSON object)")
    return obj
