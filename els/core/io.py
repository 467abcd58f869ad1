"""Atomic file writes (a reader sees the old content or the new, never part of it) and the readers of users'
CSV and JSON files."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that a reader sees the old content or the new, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with _removed_on_failure(tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file`, atomically (see `write_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    with _removed_on_failure(tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)


@contextmanager
def _removed_on_failure(tmp: str) -> Iterator[None]:
    """A failed write (full disk, interrupt) leaves no temporary file beside its target."""
    try:
        yield
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_CSV_FIELD_LIMIT = 2**31 - 1


def csv_rows(lines: Iterable[str], source: str) -> list[dict]:
    """csv.DictReader's rows of `lines` (a text file or a list of lines); a malformed file is one line naming
    `source`. Fields may be long (a pasted document as a prompt): the csv module's 128 KiB cap is lifted."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        return list(csv.DictReader(lines))
    except csv.Error as e:
        raise ValueError(f"{source}: not a readable CSV file ({e})") from None


# Deeper than any file the project writes (a manifest is 4 levels deep), far below the recursion limit at which
# json.loads itself fails with a RecursionError.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_loads(text: str, source: str) -> Any:
    """json.loads of a file's text or of one of its lines (`source` names which): the one JSON reader of user
    files. Bad JSON, or nesting deeper than MAX_JSON_DEPTH (refused before parsing), is one line naming `source`."""
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{source} is not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{source} is not valid JSON ({e})") from e  # --debug shows the parser's error


def read_json(path: Path) -> Any:
    """The JSON value in the file `path` (`json_loads`); text that is not UTF-8 is one line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    return json_loads(text, str(path))


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; anything else (bad JSON, bad UTF-8, a list) is one line naming the file."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not {what} (a JSON object)")
    return obj


def _overlap(flag: str, out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is, contains or is inside an input: writing there could replace or delete it."""
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        how = (
            "is"
            if target == source
            else "is inside"
            if source in target.parents
            else "contains"
            if target in source.parents
            else None
        )
        if how:
            raise ValueError(
                f"{flag} {out} {how} the input {given}; an input is never overwritten: choose another {flag}"
            )


def check_output_dir(
    flag: str, out: Path, inputs: Iterable[Path], owns: Iterable[str], overwrite: bool = False
) -> None:
    """Before any work: refuse a folder output that overlaps an input (always), that is a file, or that already
    holds entries other than the `owns` names the command writes there (a rerun or resume finds only those),
    unless `overwrite` (the command still replaces only its own files, so the others are kept)."""
    out = Path(out)
    _overlap(flag, out, inputs)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder")
    if out.is_dir() and not overwrite:
        # write_atomic's temporary files (".NAME.xxxx") left by a crash are the command's own too
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in owns and not any(p.name.startswith(f".{n}.") for n in owns)
        )
        if foreign:
            raise ValueError(
                f"{flag} {out} already holds files this command did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): choose an empty or new folder, or pass "
                f"--overwrite to write beside them"
            )


def check_output_file(flag: str, out: Path, inputs: Iterable[Path]) -> None:
    """Before any work: refuse a file output that is an input or a folder."""
    _overlap(flag, Path(out), inputs)
    if Path(out).is_dir():
        raise ValueError(f"{flag} {out} is a folder, not a file")
