"""The whole recipe in one call: collect states, train the energies, build the artefact, check it on held-out prompts.

lm = load_model("default")
art = train(lm, "runs/default")  # what `els run` does, with the same defaults
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from els.core.generation import DEFAULT_MAX_NEW_TOKENS, generate
from els.core.models import LoadedModel, cache_dir
from els.core.stats import stratified_split, youden_threshold
from els.data.prompts import load_prompts
from els.data.promptset import PromptSet
from els.judges.model import Judge, get_judge
from els.steering.artefact import (
    DEFAULT_LAYER_RULE,
    DEFAULT_TOP_N,
    LAYER_RULES,
    Artefact,
    layer_probes_gate,
    package_version,
    steer_layers,
)
from els.steering.energy import CONTRASTS, STATES
from els.steering.gate import HarmGate
from els.steering.manifest import FORMAT_VERSION, Manifest
from els.steering.settings import SteerSettings
from els.steering.steering import Steering
from els.training.collect import Collection, collect
from els.training.energy import TrainConfig, TrainResult, fit_harm_probe, train_energy
from els.training.gate import fit_gate
from els.training.pool import DEFAULT_EVAL, DEFAULT_EXCLUDE, DEFAULT_POOL, load_spec

DEFAULT_BENIGN = ("els-benign",)
# Plain harmful prompts give safe refusals, their framed versions most of the jailbreaks: the safety energy
# needs both.
DEFAULT_HARMFUL = ("els-harmful", "els-harmful-framed")
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
    # The harm gate's pool (els.training.pool specs); empty: a probe on the collection's own prompts instead.
    harm_data: tuple[str, ...] = DEFAULT_POOL
    # Removed from the pool with their near-duplicates: the evaluation and tuning sets.
    harm_exclude: tuple[str, ...] = DEFAULT_EVAL + DEFAULT_EXCLUDE
    # The gate's threshold flags at most this share of the pool's benign validation prompts (macro over sources).
    harm_flag_rate: float = 0.05
    # The artefact's harm_gate is the threshold chosen on the pool (False: settings.harm_gate as given).
    pool_threshold: bool = True

    @property
    def harm_specs(self) -> tuple[str, ...]:
        """The specs `harm_sets` reads: the pool and, with one, the sets removed from it."""
        return self.harm_data + self.harm_exclude if self.harm_data else ()


@dataclass(frozen=True)
class HarmSets:
    """The harm gate's inputs, loaded: its pool, and the sets whose near-duplicates leave the pool."""

    pool: list[PromptSet]
    exclude: list[PromptSet]


def harm_sets(recipe: Recipe = Recipe()) -> HarmSets | None:
    """Load the recipe's pool (a missing set is an error) and exclusion sets (a missing one is skipped: a set
    this machine cannot read is one it cannot be evaluated on either); None without a pool. Cheap: call it
    before any model work."""
    if not recipe.harm_data:
        return None
    exclude = []
    for spec in recipe.harm_exclude:
        try:
            exclude.append(load_spec(spec))
        except FileNotFoundError:
            pass
    return HarmSets([load_spec(s) for s in recipe.harm_data], exclude)


def fit_harm_gate(
    lm: LoadedModel,
    recipe: Recipe = Recipe(),
    cache: Path | None = None,
    progress: bool = True,
    sets: HarmSets | None = None,
    collection: Collection | None = None,
) -> HarmGate | None:
    """The recipe's harm gate, from prompt-only forward passes of its pool (cached); None without a pool.
    Pool prompts the `collection` holds (recorded with the template's own system prompt) reuse its prefill
    states instead of running again."""
    sets = sets or harm_sets(recipe)
    if sets is None:
        return None
    known = None
    if collection is not None and collection.meta.get("system") is None:
        known = {r.prompt: a for r, a in zip(collection.records, collection.activations)}
    gate, _ = fit_gate(
        lm,
        sets.pool,
        [],
        cache or cache_dir() / "gate",
        exclude=sets.exclude,
        progress=progress,
        seed=recipe.train.seed,
        max_false_flag=recipe.harm_flag_rate,
        known=known,
    )
    return gate


def fit(collection: Collection, recipe: Recipe = Recipe(), gate: HarmGate | None = None) -> Artefact:
    """Train the energies on a finished collection and build the artefact: the compliance energy
    (`recipe.train.contrast`) and, when flagged prompts are to be refused, the safety energy. With a pooled
    `gate`, the harm gate's threshold is the one chosen on the pool's validation split (unless the recipe turns
    the gate off)."""
    result = train_energy(collection.activations, collection.states, recipe.train)
    settings = recipe.settings
    safety = None
    if settings.harm_gate is not None and settings.flagged == "refuse":
        safety = train_energy(collection.activations, collection.states, safety_config(recipe.train))
    if gate is not None and settings.harm_gate is not None and recipe.pool_threshold:
        settings = replace(settings, harm_gate=gate.threshold)
    return make_artefact(
        result,
        collection,
        recipe.train,
        settings,
        layer_rule=recipe.layer_rule,
        top_n=recipe.top_n,
        gate=gate,
        safety=safety,
    )


def safety_config(cfg: TrainConfig) -> TrainConfig:
    """The safety energy's training: the compliance energy's, on the harmful prompts' two states."""
    return replace(cfg, contrast="safety")


def train(
    lm: LoadedModel,
    out: Path | str,
    *,
    benign: list[PromptSet] | None = None,
    harmful: list[PromptSet] | None = None,
    recipe: Recipe = Recipe(),
    progress: bool = True,
) -> Artefact:
    """Collect into OUT/collect (resumable), train, and save OUT/artefact; returns the artefact, ready for `steer`."""
    out = Path(out)
    benign = benign or [load_prompts(s).with_kind("benign") for s in DEFAULT_BENIGN]
    harmful = harmful or [load_prompts(s).with_kind("harmful") for s in DEFAULT_HARMFUL]
    sets = harm_sets(recipe)  # a missing input fails here, before any generation
    col = collect(
        lm,
        [*benign, *harmful],
        out / "collect",
        judge=get_judge(recipe.judge),
        max_new_tokens=recipe.max_new_tokens,
        batch_size=recipe.batch_size,
        system=recipe.system,
        progress=progress,
    )
    art = fit(col, recipe, fit_harm_gate(lm, recipe, progress=progress, sets=sets, collection=col))
    art.save(out / "artefact")
    return art


def held_out(collection: Collection, cfg: TrainConfig) -> list[int]:
    """Rows neither energy learned from: outside the training split of the compliance energy (`cfg.contrast`)
    and of the safety energy, as `train_energy` draws them. (The harm probe fitted on the collection, used only
    without a pooled gate, draws its own split.)"""
    states = collection.states
    trained: set[int] = set()
    for contrast in (cfg.contrast, "safety"):
        good, bad = CONTRASTS[contrast]
        used = [i for i, s in enumerate(states) if s in good + bad]
        val = stratified_split([states[i] for i in used], cfg.val_fraction, cfg.seed, STATES)[1]
        trained |= set(used) - {used[i] for i in val}
    return [i for i in range(len(states)) if i not in trained]


def validate(
    lm: LoadedModel,
    artefact: Artefact,
    collection: Collection,
    rows: list[int],
    judge: Judge,
    *,
    n: int = VALIDATION_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, dict[str, float]]:
    """Benign compliance and harmful refusal, base and steered with the artefact's own settings, on up to `n`
    prompts per kind of `rows` (see `held_out`). Base is the collection's own verdict on those rows: the same
    model answered them there, so only the steered answers are generated."""
    held = [collection.records[i] for i in rows]
    out: dict[str, dict[str, float]] = {}
    for kind, key in (("benign", "benign_compliance"), ("harmful", "harmful_refusal")):
        records = [r for r in held if r.kind == kind][:n]
        if not records:
            continue
        prompts = [r.prompt for r in records]
        with Steering(lm.model, artefact):
            answers = generate(
                lm, prompts, max_new_tokens=max_new_tokens, system=collection.meta["system"], horizon=judge.horizon
            )
        for name, refused in (("base", [r.refused for r in records]), ("steered", judge(prompts, answers))):
            share = sum(refused) / len(prompts)
            out.setdefault(name, {})[key] = 1 - share if kind == "benign" else share
            out[name][f"{kind}_n"] = len(prompts)
    return out


def make_artefact(
    result: TrainResult,
    collection: Collection,
    train_cfg: TrainConfig,
    settings: SteerSettings = SteerSettings(),
    *,
    layer_rule: str = DEFAULT_LAYER_RULE,
    top_n: int = DEFAULT_TOP_N,
    trained_layers: list[int] | None = None,
    gate: HarmGate | None = None,
    safety: TrainResult | None = None,
) -> Artefact:
    """Record per-layer validation AUC, choose `top_n` layers by `layer_rule` (see `steer_layers`), and
    calibrate per-layer gate offsets and step scales. `trained_layers`: the collection's layers the energy
    models belong to (default all). `gate`: the harm gate (els.training.gate.fit_gate); without one, a probe
    fitted on the collection's own prompts at the first steered layer (weaker: see docs/design.md). `safety`: the
    safety energy (`safety_config`), for flagged prompts under flagged="refuse"."""
    if layer_rule not in LAYER_RULES:
        raise ValueError(f"layer rule must be one of {LAYER_RULES}, got {layer_rule!r}")
    if not isinstance(settings.positions, str):
        raise ValueError(f"an artefact steers all rows at the same positions, got {settings.positions!r}")
    num_layers = collection.activations.shape[1]
    trained_layers = list(range(num_layers)) if trained_layers is None else list(trained_layers)
    if not 1 <= top_n <= len(trained_layers):
        raise ValueError(f"top_n must be between 1 and {len(trained_layers)}, got {top_n}")
    acts = collection.activations[:, trained_layers].float()
    good = torch.tensor([s in CONTRASTS[train_cfg.contrast][0] for s in collection.states])
    va = torch.tensor(result.val_index)
    with torch.no_grad():
        e_val = result.energy(acts[va].transpose(0, 1))  # [S, V]
    offsets = [youden_threshold(e, good[va]) for e in e_val]
    harmful = torch.tensor([r.kind == "harmful" for r in collection.records])
    # The probe reads every prompt, whatever rows the energy used: its own split over all states (the same
    # split as the energy's under the four-state contrast).
    probe_tr, probe_va = stratified_split(collection.states, train_cfg.val_fraction, train_cfg.seed, STATES)
    probe_w, probe_b = fit_harm_probe(collection.activations[:, trained_layers], harmful, probe_tr)
    with torch.no_grad():
        p_val = torch.einsum("nsd,sd->sn", acts[probe_va], probe_w) + probe_b[:, None]
    probe_acc = ((p_val > 0) == harmful[probe_va]).float().mean(1)
    if safety is None and settings.harm_gate is not None and settings.flagged == "refuse":
        raise ValueError("flagged='refuse' needs the safety energy: pass the TrainResult of safety_config")
    auc = {layer: round(a, 4) for layer, a in zip(trained_layers, result.val_auc)}
    layers = steer_layers(auc, num_layers, layer_rule, top_n)
    m = collection.meta
    fields = {  # the manifest as the file lays it out
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "base_model": m["model"],
        "model_fingerprint": m["model_fingerprint"],
        "hidden_size": acts.shape[-1],
        "num_layers": num_layers,
        "trained_layers": trained_layers,
        "layer_auc": {str(layer): a for layer, a in auc.items()},
        "layer_train_auc": {str(layer): round(a, 4) for layer, a in zip(trained_layers, result.train_auc)},
        # eta is a fraction of this norm, so one setting means the same push at every layer and model.
        "hidden_norm": {
            str(layer): round(float(acts[:, i].norm(dim=-1).mean()), 4) for i, layer in enumerate(trained_layers)
        },
        # The loss is shift-invariant, so energies are only comparable within a layer: the gate compares
        # E - offset, with offset the layer's best validation split between good and bad.
        "gate_offset": {str(layer): round(float(o), 6) for layer, o in zip(trained_layers, offsets)},
        "probe_val_acc": {str(layer): round(float(a), 4) for layer, a in zip(trained_layers, probe_acc)},
        "steer": {"layers": layers, "layer_rule": layer_rule, **settings.manifest()},
        "energy": {
            "contrast": train_cfg.contrast,
            "widths": list(train_cfg.widths),
            "dropout": train_cfg.dropout,
            "tau": train_cfg.tau,
            "lr": train_cfg.lr,
            "batch_size": train_cfg.batch_size,
            "epochs_run": result.epochs_run,
            "seed": train_cfg.seed,
        },
        "data": {
            "counts": collection.counts(),
            "sets": m["sets"],
            "judge": m["judge"],
            "max_new_tokens": m["max_new_tokens"],
            "system": m["system"],
        },
    }
    if safety is not None:
        fields["safety"] = {
            "contrast": "safety",
            "layer_auc": {str(layer): round(a, 4) for layer, a in zip(trained_layers, safety.val_auc)},
            "layer_train_auc": {str(layer): round(a, 4) for layer, a in zip(trained_layers, safety.train_auc)},
            "epochs_run": safety.epochs_run,
        }
    if gate is None:
        threshold = settings.harm_gate if isinstance(settings.harm_gate, float) else 0.5
        gate = layer_probes_gate(trained_layers, num_layers, layers[0], probe_w, probe_b, threshold)
    elif gate.directions is not None and len(gate.directions) < num_layers:
        # The pool's forward passes stopped at the gate's searched depth; above it (where steering usually
        # acts, and `project` needs a direction) the collection's harm probe gives one.
        directions = torch.zeros(num_layers, acts.shape[-1])
        directions[trained_layers] = probe_w.float()
        directions[: len(gate.directions)] = gate.directions.float()
        gate = replace(gate, directions=directions)
    # validated as `Artefact.load` validates it: an artefact this writes is one that loads
    return Artefact(result.energy, Manifest.model_validate(fields), gate, None if safety is None else safety.energy)
