"""The schema of a collection's files (collect.json, states.jsonl, states.safetensors and the batch shards):
each is parsed and checked on load, so that a damaged or edited file is one line naming it, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from els.core.io import json_loads, read_json_object
from els.steering.energy import STATES
from els.steering.manifest import MAX_HIDDEN_SIZE, MAX_LAYERS

State = Literal[STATES]  # type: ignore[valid-type]
# Far above any residual stream (even the "massive activations" of some models stay below 1e4), far below
# what overflows an energy's float32 training: a larger value is an edited or corrupted file.
MAX_ACTIVATION = 1e6


class RecordFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a shard's row also holds its index

    prompt: StrictStr
    kind: Literal["benign", "harmful"]
    source: StrictStr
    answer: StrictStr
    refused: StrictBool
    state: State


class MetaFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # the settings are compared as written, not read one by one

    # what training copies into the artefact's manifest
    model: StrictStr
    model_fingerprint: StrictStr
    sets: dict
    judge: StrictStr
    max_new_tokens: StrictInt
    system: StrictStr | None
    # the activations' shape (collections written before it was recorded lack it)
    num_layers: Annotated[StrictInt, Field(ge=1, le=MAX_LAYERS)] | None = None
    hidden_size: Annotated[StrictInt, Field(ge=1, le=MAX_HIDDEN_SIZE)] | None = None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    return f"{where + ': ' if where else ''}{err['msg']}"


def read_meta(path: Path) -> dict:
    """collect.json, a JSON object with at least the fields training reads (MetaFields)."""
    meta = read_json_object(path, "a collection's settings")
    try:
        MetaFields.model_validate(meta)
    except ValidationError as e:
        raise ValueError(f"{path}: {_first_error(e)}") from None
    return meta


def read_rows(path: Path) -> list[dict]:
    """The rows of states.jsonl (or a shard's .jsonl), each checked against RecordFields; returned as written."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (an editor's, after the last row) hold no row
        row = json_loads(line, f"{path} line {n}")
        try:
            RecordFields.model_validate(row)
        except ValidationError as e:
            raise ValueError(f"{path} line {n}: {_first_error(e)}") from None
        rows.append(row)
    return rows


def read_activations(path: Path, rows: int | None = None, meta: dict | None = None) -> torch.Tensor:
    """The float [N, L, d] `activations` tensor of `path`, finite, with `rows` rows when given and the layers and
    width the collection's settings `meta` (read_meta) record."""
    try:
        acts = load_file(path)["activations"]
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    except KeyError:
        raise ValueError(f"{path} holds no `activations` tensor") from None
    if acts.ndim != 3 or not acts.is_floating_point():
        raise ValueError(f"{path}: activations must be a float [N, L, d] tensor, got {acts.dtype} {list(acts.shape)}")
    if rows is not None and acts.shape[0] != rows:
        raise ValueError(f"{path}: {acts.shape[0]} activation rows for {rows} records")
    for axis, key in ((1, "num_layers"), (2, "hidden_size")):
        if meta is not None and meta.get(key) is not None and acts.shape[axis] != meta[key]:
            raise ValueError(
                f"{path}: activations of {acts.shape[1]} layers of width {acts.shape[2]} do not fit the "
                f"collection's collect.json ({key} {meta[key]})"
            )
    if not torch.isfinite(acts).all():
        raise ValueError(f"{path}: activations contain NaN or infinity")
    if (largest := float(acts.abs().max())) > MAX_ACTIVATION:
        raise ValueError(
            f"{path}: an activation of magnitude {largest:.3g} (at most {MAX_ACTIVATION:g} in a model's "
            f"residual stream)"
        )
    return acts
