"""Where `els eval` keeps its answers: cache keys and the append-only completion files.

A key is a digest of (model fingerprint, method config, prompt, generation settings): a rerun generates
nothing it already has. Keys and file layout are an on-disk format: changing what goes into a key
invalidates every cached answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch

from els.core.io import json_loads, write_atomic
from els.core.models import LoadedModel, config_fingerprint
from els.eval.methods import Method
from els.steering.artefact import Artefact


def slug(name: str) -> str:
    """A file-name-safe form of a set or method name; names with a path get a short hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._@=-]+", "_", name.rsplit("/", 1)[-1]).strip("._") or "set"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def model_fingerprint(lm: LoadedModel) -> str:
    """Architecture, dtype, chat template and a strided sample of every weight: cheap, and a fine-tune differs."""
    h = hashlib.sha256(config_fingerprint(lm.model).encode())
    h.update(str(lm.model.dtype).encode())
    h.update((lm.tokenizer.chat_template or "").encode())
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def artefact_digest(art: Artefact) -> str:
    """The manifest and every tensor, the harm gate's included: a retrained gate must not reuse answers. The
    manifest's integrity record is left out: it is derived from the tensors, and artefacts saved before it
    existed keep their digest (and their cached answers)."""
    manifest = art.manifest.record(art.gate.report, integrity=False)
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for name, t in sorted(art.tensors().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(v: object) -> object:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return hashlib.sha256(v.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(v, Artefact):
        return artefact_digest(v)
    return repr(v)


def method_config(method: Method) -> dict:
    """What decides a method's answers. A method may define `config() -> dict`; dataclasses are read field by field."""
    custom = getattr(method, "config", None)
    if callable(custom):
        body = _jsonable(custom())
    elif is_dataclass(method):
        body = {f.name: _jsonable(getattr(method, f.name)) for f in fields(method)}
    else:
        body = {}
    return {"type": type(method).__qualname__, "name": method.name, "system": method.system, "config": body}


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_key(model_fp: str, method_cfg_digest: str, prompt: str, generation: dict) -> str:
    return digest([model_fp, method_cfg_digest, prompt, generation])[:24]


class CompletionFile:
    """JSONL rows keyed by cache key. Appends are flushed and fsynced; a torn last line is dropped on load."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        self.dropped = 0
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            for line in lines:
                try:
                    row = json_loads(line, str(path))
                    self.rows[row["key"]] = row
                except (ValueError, KeyError, TypeError):  # ValueError: bad JSON, or nested too deep
                    self.dropped += 1  # the batch being written when a run died
            if self.dropped or (lines and not path.read_bytes().endswith(b"\n")):
                self.rewrite()

    def append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[r["key"]] = r

    def rewrite(self) -> None:
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))
