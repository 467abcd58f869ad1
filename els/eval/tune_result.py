"""What `els tune` found, OUT/pareto.json, as one typed record: `TuneResult`, written by the tune and read back by
`els tune`'s report, the tuned artefact and anything reading an older study's file. The models' fields are the
file's format; a trial's `settings` are the manifest's `steer` spelling, so files written before a rename still
read (`threshold` for `energy_gate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue, model_serializer, model_validator

from els.core.io import read_json_object, write_atomic
from els.steering.settings import Positions, SteerSettings


class ScoreSummary(BaseModel):
    """A method's two objectives and fluency on the validation prompts, rounded as reported."""

    benign_compliance: float
    harmful_refusal: float
    nll: float


class TrialParams(BaseModel):
    """What Optuna searched in one trial, as it suggested them; studies before a knob existed lack it."""

    layer_rule: str
    n_layers: int
    eta: float
    steps: int
    gate: bool
    threshold: float | None = None  # suggested only with the energy gate on
    harm_gate: float | None = None
    positions: Positions = "last"
    project: bool = False


class TrialSettings(BaseModel):
    """The steered layers and the `SteerSettings` a trial ran with, written flat: `layers` and the settings'
    fields."""

    model_config = ConfigDict(frozen=True)

    layers: list[int]
    steer: SteerSettings

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or "steer" in raw:
            return raw
        fields = {k: v for k, v in raw.items() if k != "layers"}
        fields.setdefault("harm_gate", None)  # files without it predate the harm gate
        return {"layers": raw.get("layers"), "steer": SteerSettings.from_manifest(fields)}

    @model_serializer
    def _dump(self) -> dict[str, Any]:
        return {"layers": self.layers, **self.steer.manifest()}


class TrialRow(BaseModel):
    trial: int
    settings: TrialSettings
    params: TrialParams
    benign_compliance: float
    harmful_refusal: float
    nll: float
    fluent: bool  # NLL within the rule's margin over the base model's
    pareto: bool  # on the study's Pareto front

    def scores(self) -> ScoreSummary:
        return ScoreSummary(
            benign_compliance=self.benign_compliance, harmful_refusal=self.harmful_refusal, nll=self.nll
        )


class TuneConfig(BaseModel):
    """What a study was run with; resuming it with anything else is refused."""

    sets: dict[str, JsonValue]  # the validation prompts' names, limit and seed, as the CLI describes them
    judge: str
    max_new_tokens: int
    seed: int
    max_layers: int
    base_model: str
    prompts_sha256: str
    energy_sha256: str


class TuneResult(BaseModel):
    objectives: list[str]
    rule: str
    config: TuneConfig
    threshold_range: tuple[float, float]  # the energy gate's searched range
    base: ScoreSummary  # the unsteered model
    n_trials: int
    trials: list[TrialRow]
    pareto: list[int]  # the front's trial numbers
    chosen: TrialRow
    chosen_beats_base: bool  # False: no trial helps, steering in this range is worse than none
    wall_s: float | None = None  # set once the reports are written

    def to_json(self) -> str:
        # unset: the search's parameters Optuna did not suggest (the energy gate's threshold with the gate off)
        return json.dumps(self.model_dump(exclude_unset=True), indent=2)

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> TuneResult:
        return cls.model_validate(read_json_object(path, "an els tune result"))

    def markdown(self) -> str:
        b = self.base
        lines = [
            f"# els tune: {self.n_trials} trials",
            "",
            f"Choice rule: {self.rule}.",
            "",
            (
                f"Chosen trial {self.chosen.trial}"
                f"{'' if self.chosen_beats_base else ' (does NOT beat the unsteered base model)'}."
            ),
            "",
            "| trial | layers | eta | K | positions | gate | harm gate | benign compliance | harmful refusal | NLL | "
            "front | chosen |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            (
                f"| base | - | - | - | - | - | - | {b.benign_compliance:.3f} | {b.harmful_refusal:.3f} | "
                f"{b.nll:.2f} | | |"
            ),
        ]
        for r in sorted(self.trials, key=lambda r: (-r.benign_compliance, -r.harmful_refusal)):
            s = r.settings.steer
            gate = "off" if s.energy_gate is None else f"{s.energy_gate:.3g}"
            harm = "off" if s.harm_gate is None else f"{s.harm_gate:.2g}"
            lines.append(
                f"| {r.trial} | {r.settings.layers} | {s.eta:.3g} | {s.steps} | {s.positions} | "
                f"{gate} | {harm} | "
                f"{r.benign_compliance:.3f} | {r.harmful_refusal:.3f} | {r.nll:.2f}"
                f"{'' if r.fluent else ' (garbled)'} | {'*' if r.pareto else ''} | "
                f"{'**chosen**' if r.trial == self.chosen.trial else ''} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        from els.eval.report import figure, save_figure

        fig, ax = figure(6, 5)
        for fluent, marker, label in ((True, "o", "trial"), (False, "x", "trial (garbled text)")):
            pts = [r for r in self.trials if r.fluent == fluent]
            if pts:
                ax.scatter(
                    [r.harmful_refusal for r in pts],
                    [r.benign_compliance for r in pts],
                    c="0.6",
                    marker=marker,
                    label=label,
                )
        front = sorted((r for r in self.trials if r.pareto), key=lambda r: r.harmful_refusal)
        ax.plot(
            [r.harmful_refusal for r in front],
            [r.benign_compliance for r in front],
            "o-",
            c="tab:red",
            label="Pareto front",
        )
        c, b = self.chosen, self.base
        ax.scatter(
            [c.harmful_refusal],
            [c.benign_compliance],
            s=250,
            facecolors="none",
            edgecolors="tab:blue",
            linewidths=2,
            label=f"chosen (trial {c.trial})",
        )
        ax.scatter([b.harmful_refusal], [b.benign_compliance], marker="*", s=250, c="k", label="base model")
        ax.set(
            xlabel="harmful refusal (validation)",
            ylabel="benign compliance (validation)",
            xlim=(-0.03, 1.03),
            ylim=(-0.03, 1.03),
            title="els tune",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        save_figure(fig, path)
