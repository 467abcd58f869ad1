"""Generate answers, judge them, label the four states and record the residual stream at the last prompt token."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from els.core.executor import Batch, Executor, LocalExecutor
from els.core.generation import DEFAULT_MAX_NEW_TOKENS, length_batches, prompt_texts
from els.core.io import save_tensors_atomic, write_atomic
from els.core.models import LoadedModel, config_fingerprint
from els.data.promptset import Kind, PromptSet
from els.judges.model import Judge
from els.steering.energy import STATES
from els.training.collection_files import read_activations, read_meta, read_rows

# What a collection folder holds (`els collect --out` refuses a folder holding anything else)
COLLECTION_FILES = ("collect.json", "states.jsonl", "states.safetensors", "batches")


def state_of(kind: Kind, refused: bool) -> str:
    if kind == "benign":
        return "false_refusal" if refused else "helpful"
    return "safe_refusal" if refused else "jailbreak"


@dataclass
class Record:
    prompt: str
    kind: Kind
    source: str
    answer: str
    refused: bool
    state: str


@dataclass
class Collection:
    records: list[Record]
    activations: torch.Tensor  # [N, L, d] float32, rows aligned with records
    meta: dict

    @property
    def states(self) -> list[str]:
        return [r.state for r in self.records]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.records) for s in STATES}


def _meta(
    lm: LoadedModel, sets: list[PromptSet], max_new_tokens: int, batch_size: int, judge: Judge, system: str | None
) -> dict:
    num_layers, hidden_size = activation_shape(lm)
    return {
        "model": lm.name,
        "model_fingerprint": config_fingerprint(lm.model),
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "sets": {ps.name: {"kind": ps.kind, "n": len(ps), "sha256": ps.content_hash()} for ps in sets},
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "judge": judge.name,
        "system": system,
    }


def collect(
    lm: LoadedModel,
    sets: list[PromptSet],
    out: Path,
    *,
    judge: Judge,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
    executor: Executor | None = None,
) -> Collection:
    """Run, judge and record every prompt of `sets` into `out`; resumes an interrupted run batch by batch.

    Each finished batch is written atomically to `out/batches/`, so a crash loses at most the batch in
    flight. When all are done they are merged into `out/states.safetensors` and `out/states.jsonl`.
    `executor` generates the batches (default: here, one after another; `els.parallel.ray_executor.RayExecutor`: on Ray
    workers); they are judged and written here as they finish, so the result does not depend on where they ran.
    """
    out = Path(out)
    if max_new_tokens < 1 or batch_size < 1:  # checked before collect.json pins the settings
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {max_new_tokens}, {batch_size}")
    for ps in sets:
        if ps.kind is None:
            raise ValueError(f"prompt set {ps.name!r} needs a kind (benign or harmful)")
        if not len(ps):
            raise ValueError(f"prompt set {ps.name!r} is empty")
    meta = _meta(lm, sets, max_new_tokens, batch_size, judge, system)
    meta_path = out / "collect.json"
    if meta_path.exists():
        old = read_meta(meta_path)
        # a collection begun before collect.json recorded the activations' shape resumes all the same
        same = {k: v for k, v in meta.items() if k in old or k not in ("num_layers", "hidden_size")}
        if old != same:
            raise ValueError(
                f"{out} holds a collection made with other settings ({_diff(old, same)}); "
                "use another --out or delete it"
            )
        if (out / "states.jsonl").exists():
            return load_collection(out)
    else:
        write_atomic(meta_path, json.dumps(meta, indent=2))

    items = [(p, ps.kind, ps.name) for ps in sets for p in ps.prompts]
    texts, lengths = prompt_texts(lm, [p for p, _, _ in items], system)
    batches = length_batches(texts, lengths, batch_size)
    shard_dir = out / "batches"
    # Generation stops where the judge's verdict is fixed: the states are those of full-length answers.
    todo = [
        Batch([texts[i] for i in idx], max_new_tokens, record=True, tag=b, horizon=judge.horizon, share_prefix=True)
        for b, idx in enumerate(batches)
        if not _shard_done(shard_dir, b, idx, meta)
    ]
    finished = (executor or LocalExecutor(lm)).map(todo)
    for job, done in tqdm(
        finished, desc="collect", total=len(batches), initial=len(batches) - len(todo), disable=not progress
    ):
        b, idx = job.tag, batches[job.tag]
        answers, acts = done.texts, done.activations
        refused = judge([items[i][0] for i in idx], answers)
        rows = [
            asdict(Record(items[i][0], items[i][1], items[i][2], a, r, state_of(items[i][1], r))) | {"index": i}
            for i, a, r in zip(idx, answers, refused)
        ]
        write_atomic(shard_dir / f"{b:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        # The tensor file is written last: its presence marks the batch as complete.
        save_tensors_atomic({"activations": acts}, shard_dir / f"{b:05d}.safetensors")

    rows, acts = [], []
    for b, idx in enumerate(batches):
        rows += read_rows(shard_dir / f"{b:05d}.jsonl")
        acts.append(read_activations(shard_dir / f"{b:05d}.safetensors", len(idx), meta))
    order = sorted(range(len(rows)), key=lambda k: rows[k]["index"])
    activations = torch.cat(acts)[order]
    records = [_record(rows[k]) for k in order]
    save_tensors_atomic({"activations": activations}, out / "states.safetensors")
    write_atomic(out / "states.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
    shutil.rmtree(shard_dir)
    return Collection(records, activations, meta)


def _shard_done(shard_dir: Path, b: int, idx: list[int], meta: dict) -> bool:
    """Whether batch `b` was written whole; a torn or foreign shard is generated again rather than fatal."""
    if not (shard_dir / f"{b:05d}.safetensors").exists():
        return False
    try:
        rows = read_rows(shard_dir / f"{b:05d}.jsonl")
        read_activations(shard_dir / f"{b:05d}.safetensors", len(idx), meta)
    except (ValueError, OSError):
        return False
    return [r.get("index") for r in rows] == list(idx)


def _record(row: dict) -> Record:
    return Record(**{f: row[f] for f in Record.__dataclass_fields__})


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in new if old.get(k) != new.get(k))


def load_collection(path: Path) -> Collection:
    """A finished collection; a missing, damaged or edited file is one line naming it
    (els.training.collection_files)."""
    path = Path(path)
    if not (path / "states.jsonl").exists():
        raise FileNotFoundError(f"{path} holds no finished collection (states.jsonl); run `els collect` first")
    for name in ("states.safetensors", "collect.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a complete collection (no {name})")
    meta = read_meta(path / "collect.json")
    records = [_record(r) for r in read_rows(path / "states.jsonl")]
    if not records:
        raise ValueError(f"{path / 'states.jsonl'} holds no records")
    activations = read_activations(path / "states.safetensors", len(records), meta)
    return Collection(records, activations, meta)


def activation_shape(lm: LoadedModel) -> tuple[int, int]:
    """(layers, width) of the activations `lm` records: one row per decoder block, of its hidden size."""
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    return len(lm.blocks), cfg.hidden_size


def check_fits(col: Collection, lm: LoadedModel, where: Path) -> None:
    """Refuse activations whose layers or width are not those of `lm`: an energy trained on them could not steer it."""
    want = activation_shape(lm)
    if tuple(col.activations.shape[1:]) != want:
        raise ValueError(
            f"{where / 'states.safetensors'}: activations of {col.activations.shape[1]} layers of "
            f"width {col.activations.shape[2]} do not fit --model {lm.name} ({want[0]} layers of "
            f"width {want[1]})"
        )
