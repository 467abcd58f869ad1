"""The whole recipe in one call: collect states, train the energies, build the artefact, check it on held-out prompts.

    lm = load_model("default")
    art = train(lm, "runs/default")  # what `els run` does, with the same defaults
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from els.artefact import DEFAULT_LAYER_RULE, DEFAULT_TOP_N, Artefact, make_artefact
from els.collect import Collection, collect
from els.data import PromptSet, load_prompts
from els.energy import CONTRASTS, TrainConfig, stratified_split, train_energy
from els.gate_training import DEFAULT_EVAL, DEFAULT_EXCLUDE, DEFAULT_POOL, fit_gate, load_spec
from els.gating import HarmGate
from els.generation import DEFAULT_MAX_NEW_TOKENS, generate
from els.judges import Judge, get_judge
from els.models import LoadedModel, cache_dir
from els.settings import SteerSettings
from els.steering import Steering

DEFAULT_BENIGN = ("els-benign",)
DEFAULT_HARMFUL = ("els-harmful",)
# The judge labelling the collected answers: fast, and on the default model's terse refusals it agrees with
# the learned judge (docs/design.md).
DEFAULT_COLLECT_JUDGE = "prefix"
VALIDATION_PROMPTS = 24  # per kind: enough to see the effect, cheap enough to end every run with


@dataclass(frozen=True)
class Recipe:
    """Everything `els run` decides besides the model and the prompts; the defaults are the recipe."""

    train: TrainConfig = field(default_factory=TrainConfig)
    settings: SteerSettings = field(default_factory=SteerSettings)
    layer_rule: str = DEFAULT_LAYER_RULE
    top_n: int = DEFAULT_TOP_N
    judge: str = DEFAULT_COLLECT_JUDGE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 32
    system: str | None = None
    # The harm gate's pool (els.gate_training specs); empty: a probe on the collection's own prompts instead.
    harm_data: tuple[str, ...] = DEFAULT_POOL
    # Removed from the pool with their near-duplicates: the evaluation and tuning sets.
    harm_exclude: tuple[str, ...] = DEFAULT_EVAL + DEFAULT_EXCLUDE
    # The gate's threshold flags at most this share of the pool's benign validation prompts (macro over sources).
    harm_flag_rate: float = 0.05


@dataclass(frozen=True)
class HarmSets:
    """The harm gate's inputs, loaded: its pool, and the sets whose near-duplicates leave the pool."""

    pool: list[PromptSet]
    exclude: list[PromptSet]


def harm_sets(recipe: Recipe = Recipe()) -> HarmSets:
    """Load the recipe's pool (a missing set is an error) and exclusion sets (a missing one is skipped: a set
    this machine cannot read is one it cannot be evaluated on either). Cheap: call it before any model work."""
    exclude = []
    for spec in recipe.harm_exclude:
        try:
            exclude.append(load_spec(spec))
        except FileNotFoundError:
            pass
    return HarmSets([load_spec(s) for s in recipe.harm_data], exclude)


def fit_harm_gate(lm: LoadedModel, recipe: Recipe = Recipe(), cache: Path | None = None, progress: bool = True,
                  sets: HarmSets | None = None) -> HarmGate | None:
    """The recipe's harm gate, from prompt-only forward passes of its pool (cached); None without a pool."""
    if not recipe.harm_data:
        return None
    sets = sets or harm_sets(recipe)
    gate, _ = fit_gate(lm, sets.pool, [], cache or cache_dir() / "gate", exclude=sets.exclude, progress=progress,
                       seed=recipe.train.seed, max_false_flag=recipe.harm_flag_rate)
    return gate


def fit(collection: Collection, recipe: Recipe = Recipe(), gate: HarmGate | None = None) -> Artefact:
    """Train the energies on a finished collection and build the artefact. With a pooled `gate`, the harm
    gate's threshold is the one chosen on the pool's validation split (unless the recipe turns it off)."""
    result = train_energy(collection.activations, collection.states, recipe.train)
    settings = recipe.settings
    if gate is not None and settings.harm_gated:
        settings = replace(settings, harm_gate=gate.threshold)
    return make_artefact(result, collection, recipe.train, settings, layer_rule=recipe.layer_rule,
                         top_n=recipe.top_n, gate=gate)


def train(lm: LoadedModel, out: Path | str, *, benign: list[PromptSet] | None = None,
          harmful: list[PromptSet] | None = None, recipe: Recipe = Recipe(), progress: bool = True) -> Artefact:
    """Collect into OUT/collect (resumable), train, and save OUT/artefact; returns the artefact, ready for `steer`."""
    out = Path(out)
    benign = benign or [load_prompts(s).with_kind("benign") for s in DEFAULT_BENIGN]
    harmful = harmful or [load_prompts(s).with_kind("harmful") for s in DEFAULT_HARMFUL]
    sets = harm_sets(recipe) if recipe.harm_data else None  # a missing input fails here, before any generation
    col = collect(lm, [*benign, *harmful], out / "collect", judge=get_judge(recipe.judge),
                  max_new_tokens=recipe.max_new_tokens, batch_size=recipe.batch_size, system=recipe.system,
                  progress=progress)
    art = fit(col, recipe, fit_harm_gate(lm, recipe, progress=progress, sets=sets))
    art.save(out / "artefact")
    return art


def held_out(collection: Collection, cfg: TrainConfig) -> list[int]:
    """Rows no part of the artefact learned from: benign ones from the energy's validation split, harmful
    ones from the harm probe's (the split each component was checked on, as `train_energy` and
    `make_artefact` draw them)."""
    states = collection.states
    good, bad = CONTRASTS[cfg.contrast]
    used = [i for i, s in enumerate(states) if s in good + bad]
    energy_val = {used[i] for i in stratified_split([states[i] for i in used], cfg.val_fraction, cfg.seed)[1]}
    probe_val = set(stratified_split(states, cfg.val_fraction, cfg.seed)[1])
    return [i for i, r in enumerate(collection.records) if i in (probe_val if r.kind == "harmful" else energy_val)]


def validate(lm: LoadedModel, artefact: Artefact, collection: Collection, rows: list[int], judge: Judge, *,
             n: int = VALIDATION_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict[str, dict[str, float]]:
    """Benign compliance and harmful refusal, base and steered with the artefact's own settings, on up to `n`
    prompts per kind of `rows` (see `held_out`)."""
    held = [collection.records[i] for i in rows]
    out: dict[str, dict[str, float]] = {}
    for kind, key in (("benign", "benign_compliance"), ("harmful", "harmful_refusal")):
        prompts = [r.prompt for r in held if r.kind == kind][:n]
        if not prompts:
            continue
        for name in ("base", "steered"):
            with Steering(lm.model, artefact) if name == "steered" else nullcontext():
                answers = generate(lm, prompts, max_new_tokens=max_new_tokens, system=collection.meta["system"],
                                   horizon=judge.horizon)
            refused = judge(prompts, answers)
            share = sum(refused) / len(prompts)
            out.setdefault(name, {})[key] = 1 - share if kind == "benign" else share
            out[name][f"{kind}_n"] = len(prompts)
    return out
