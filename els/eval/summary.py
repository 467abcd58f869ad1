"""The evaluation's summary, OUT/summary.json: what `els.eval.harness` measures and `els.eval.report` and `els eval`
read. The models' fields are the file's format; an optional entry a run did not record stays absent from the file
(it is written with the fields that were set), so summaries written before these models read the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from els.core.io import read_json_object, write_atomic
from els.data.promptset import Kind


class Rate(BaseModel):
    """Refusals among n verdicts, with the 95% Wilson interval."""

    refusal_rate: float  # nan when n is 0
    ci95: tuple[float, float]
    n: int
    refusals: int


class Paired(BaseModel):
    """Exact McNemar test against another method on the same prompts: prompts refused by this one alone
    (`a_only`) and by the other alone (`b_only`)."""

    a_only: int
    b_only: int
    p: float


class PairedRate(Rate):
    paired: dict[str, Paired]  # by the method compared against (base)


class MethodRate(PairedRate):
    """One method on one benchmark."""

    categories: dict[str, Rate] | None = None  # sets with categories
    compliance: float | None = None  # benign sets: 1 - refusal rate
    judge_fallbacks: int | None = None  # a model judge's unparseable replies
    other_judges: dict[str, float] | None = None  # refusal rate by each other judge (not for composed methods)
    mean_tokens: float | None = None


class Overall(BaseModel):
    """Per method, pooled over the sets of one kind; a kind without sets is absent."""

    benign: dict[str, PairedRate] | None = None
    harmful: dict[str, PairedRate] | None = None

    def by_kind(self) -> dict[str, dict[str, PairedRate]]:
        return {kind: per for kind, per in (("benign", self.benign), ("harmful", self.harmful)) if per is not None}


class Benchmark(BaseModel):
    kind: Kind
    n: int
    methods: dict[str, MethodRate]


class Quality(BaseModel):
    """One method against base on `quality_tokens`-token answers to the harmless set (when measured): KL on the
    `kl_prompts` the harm gate passes, unchanged answers and repeated 4-grams (a share in [0, 1]); and the share
    of unchanged answers on the benign prompts base answered."""

    unchanged_share: float | None = None
    repeated_4gram: float | None = None
    quality_set: str | None = None
    quality_n: int | None = None
    quality_tokens: int | None = None
    kl_prompts: int | None = None
    kl_mean: float | None = None
    kl_tokens: int | None = None
    unchanged_share_benign_answered: float | None  # None: base answered none
    benign_answered_n: int


class Capability(BaseModel):
    """Multiple-choice accuracy from the answer letters' logits (els.eval.quality.mc_accuracy)."""

    set: str
    n: int
    accuracy: float


class Speed(BaseModel):
    batch: int
    tokens: int
    seconds: float
    tokens_per_s: float
    rounds: int
    ratio_to_base: float


class JudgeId(BaseModel):
    name: str
    version: str


class GenerationInfo(BaseModel):
    max_new_tokens: int
    do_sample: bool
    batch_size: int
    greedy: bool
    dtype: str
    device: str
    limit: int | None
    seed: int


class EvalTimings(BaseModel):
    """Seconds per stage, in the order run."""

    generate_s: float
    judge_s: float
    quality_s: float
    speed_s: float
    total_s: float

    def stages(self) -> dict[str, float]:
        """Stage name (without `_s`) -> seconds."""
        return {name.removesuffix("_s"): seconds for name, seconds in self.model_dump().items()}


class RunInfo(BaseModel):
    generated: int  # answers generated in this run; the rest came from the cache
    timings_s: EvalTimings


class Example(BaseModel):
    """A prompt whose verdict differs between base and a method; each one's answer is filed under its name."""

    model_config = ConfigDict(extra="allow")  # the answers' keys are the method names

    set_name: str = Field(alias="set")
    prompt: str
    base_refused: bool

    def answer(self, method: str) -> str:
        return str((self.model_extra or {})[method])


class Summary(BaseModel):
    model: str
    model_fingerprint: str
    judge: str  # the headline judge, the first of `judges`
    judges: list[JudgeId]
    generation: GenerationInfo
    methods: dict[str, dict[str, Any]]  # els.eval.cache.method_config of each method
    benchmarks: dict[str, Benchmark]
    overall: Overall
    quality: dict[str, Quality]
    capability: dict[str, Capability] = {}
    speed: dict[str, list[Speed]]
    run: RunInfo
    examples: dict[str, dict[str, list[Example]]]  # method -> kind -> examples

    def reported_methods(self) -> list[str]:
        """The run's methods, and the ones composed from them (els.eval.comparison), in the summary's order."""
        return list(next(iter(self.benchmarks.values())).methods) if self.benchmarks else []

    def method_settings(self, method: str) -> dict[str, Any]:
        """The steering settings a method ran with (ELS's overrides of its artefact); empty if none."""
        return dict(self.methods.get(method, {}).get("config", {}).get("settings", {}))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_unset=True), indent=2)

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> Summary:
        # json, not pydantic's parser: NaN rates
        return cls.model_validate(read_json_object(path, "an evaluation summary"))
