"""The artefact's manifest (els.json) as one typed object, `Artefact.manifest`: every field the library reads,
typed and range-checked on load, so that an edited field is one line naming the file and the field, never a
traceback later on. Nothing outside this module reads the manifest by key.

The harm gate's report (`harm_gate_probe` in the file) and its threshold belong to the gate (`Artefact.gate`):
`Manifest.read` hands the report over and `Manifest.record` writes it back, so the manifest keeps no second copy
that could disagree with the gate it describes.

The file's bytes: fields are declared in the order the recipe writes them (sections written for people, not
read here, are kept as JSON where their place needs a declaration), and a manifest is written with exactly the
keys it was read or made with, so an artefact saved again is the file it was read from (a format 1 artefact is
written at format 2, as its gate now is). Keys this module does not know move to the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from els.core.io import read_json_object
from els.steering.settings import MAX_ENERGY_GATE, MAX_ETA, MAX_STEPS, SteerSettings

FORMAT_VERSION: Final = 2  # 2: the harm gate is a HarmGate of its own layer (1: a probe per trained layer)
READABLE_FORMATS = (1, 2)
INTEGRITY = "weights"  # the key of `Manifest.weights` in the file
GATE_REPORT = "harm_gate_probe"  # the key of the harm gate's report in the file (format 2)

Number = StrictFloat | StrictInt
Finite = Annotated[Number, Field(allow_inf_nan=False)]
Layer = Annotated[StrictInt, Field(ge=0)]
# Upper bounds no real artefact reaches (the largest open models have hidden size 16,384 and 126 layers; the
# paper's widths are 2,048 at most), so that an edited number is refused, not allocated or computed with.
MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_WIDTH, MAX_WIDTHS = 65536, 1024, 16384, 16
Bounded = Annotated[Finite, Field(ge=-1e6, le=1e6)]  # a layer's mean hidden norm or energy offset
EnergyGate = Annotated[Finite, Field(ge=-MAX_ENERGY_GATE, le=MAX_ENERGY_GATE)]  # SteerSettings' bounds, typed here
Record = JsonValue  # written for people and other tools; the library does not read it
GateReport = dict[str, JsonValue]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields the library does not read are the writer's business


class EnergyFields(_Open):
    contrast: Record = None
    widths: list[Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]] = Field(min_length=1, max_length=MAX_WIDTHS)
    dropout: Annotated[Number, Field(ge=0, lt=1)]


class SteerFields(_Open):
    """The `steer` section: the steered layers and a `SteerSettings` (older spellings still read)."""

    layers: list[Layer] = Field(min_length=1)
    layer_rule: StrictStr = "top_auc"  # how `layers` were chosen; manifests without it chose by validation AUC
    eta: Annotated[Finite, Field(ge=0, le=MAX_ETA)]
    steps: Annotated[StrictInt, Field(ge=0, le=MAX_STEPS)]
    energy_gate: EnergyGate | None = None
    threshold: EnergyGate | None = None  # energy_gate's name before two-sided steering
    gate: EnergyGate | None = None  # and before format 1.1
    harm_gate: Annotated[Number, Field(ge=0, le=1)] | None = None
    flagged: Literal["refuse", "leave"] = "leave"
    refuse_eta: Annotated[Finite, Field(ge=0, le=MAX_ETA)] | None = None
    refuse_gate: Annotated[Number, Field(ge=0, le=1)] | None = None
    positions: Literal["last", "prompt"] = "last"
    project: StrictBool = False

    def settings(self) -> SteerSettings:
        # the fields as written: SteerSettings fills in what older sections lack
        return SteerSettings.from_manifest(self.model_dump(exclude_unset=True))


class SafetyFields(_Open):
    """The safety energy (two-sided artefacts): its per-layer validation AUC of safe refusal against jailbreak."""

    contrast: Record = None
    layer_auc: dict[str, Annotated[Finite, Field(ge=0, le=1)]]


class Integrity(_Open):
    """Written by `Artefact.save`, checked by load when present (older artefacts lack it): the weights' sha256 and
    the layer of each energy member, so a manifest cannot pair layers with other layers' models or edited weights."""

    sha256: StrictStr
    member_layers: list[StrictInt]


class Manifest(_Open):
    format_version: Literal[1, 2]
    package_version: Record = None
    base_model: StrictStr
    model_fingerprint: StrictStr
    hidden_size: Annotated[StrictInt, Field(ge=1, le=MAX_HIDDEN_SIZE)]
    num_layers: Annotated[StrictInt, Field(ge=1, le=MAX_LAYERS)]
    trained_layers: list[Layer] = Field(min_length=1)
    # Per trained layer, keyed by the layer's number (JSON object keys are strings).
    layer_auc: dict[str, Number]  # the compliance energy's validation AUC (nan where a side was empty)
    layer_train_auc: dict[str, Number] | None = None
    hidden_norm: dict[str, Annotated[Bounded, Field(gt=0)]]
    gate_offset: dict[str, Bounded]
    probe_val_acc: Record = None
    steer: SteerFields
    energy: EnergyFields
    data: Record = None
    safety: SafetyFields | None = None
    weights: Integrity | None = None
    tune: Record = None  # how `els tune` chose `steer`

    @model_validator(mode="after")
    def _layers_agree(self) -> Manifest:
        trained = self.trained_layers
        if len(set(trained)) != len(trained) or max(trained) >= self.num_layers:
            raise ValueError(f"trained_layers {trained} must be distinct layers below num_layers {self.num_layers}")
        if len(set(self.steer.layers)) != len(self.steer.layers):
            raise ValueError(f"steer.layers {self.steer.layers} name a layer twice")
        if stray := [x for x in self.steer.layers if x not in trained]:
            raise ValueError(f"steer.layers {stray} are not among trained_layers {trained}")
        for name, values in (("hidden_norm", self.hidden_norm), ("gate_offset", self.gate_offset)):
            if missing := [x for x in trained if str(x) not in values]:
                raise ValueError(f"{name} lacks trained layers {missing}")
        return self

    @classmethod
    def read(cls, path: Path) -> tuple[Manifest, GateReport]:
        """The manifest in the file `path` and the harm gate's report; anything malformed raises ValueError, one
        line naming `path` and the first bad fields."""
        raw = read_json_object(path, "an ELS manifest")
        if raw.get("format_version") not in READABLE_FORMATS:
            raise ValueError(
                f"{path.parent}: artefact format {raw.get('format_version')}, this els reads {READABLE_FORMATS}"
            )
        report = raw.pop(GATE_REPORT, None) or {}
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            raise ValueError(f"{path}: {_first_errors(e)}") from None
        if not isinstance(report, dict):
            raise ValueError(f"{path}: {GATE_REPORT} must be a JSON object, got {type(report).__name__}")
        return manifest, report

    def record(self, gate_report: GateReport, *, integrity: bool = True) -> dict[str, Any]:
        """What els.json holds: these fields and, from format 2, the harm gate's report (without its search
        table, which `els gate` keeps in gate.json). `integrity=False` leaves out the record derived from the
        weights."""
        fields = self.model_dump(exclude_unset=True, exclude=None if integrity else {INTEGRITY})
        if self.format_version < 2:  # format 1 kept the gate as probes in the weights and nothing here
            return fields
        report = {k: v for k, v in gate_report.items() if k != "search"}
        return (
            {k: v for k, v in fields.items() if k in _BEFORE_REPORT}
            | {GATE_REPORT: report}
            | {k: v for k, v in fields.items() if k not in _BEFORE_REPORT}
        )

    def to_json(self, gate_report: GateReport) -> str:
        return json.dumps(self.record(gate_report), indent=2)

    def steering(self, layers: list[int], layer_rule: str, settings: SteerSettings) -> Manifest:
        """A copy that steers with `settings` at `layers` (chosen by `layer_rule`), spelt as today."""
        kept = {k: v for k, v in self.steer.model_dump(exclude_unset=True).items() if k not in ("threshold", "gate")}
        out = self.model_copy(deep=True)
        out.steer = SteerFields.model_validate(
            kept | {"layers": layers, "layer_rule": layer_rule} | settings.manifest()
        )
        return out

    def auc(self) -> dict[int, float]:
        """The compliance energy's validation AUC by layer."""
        return {int(k): v for k, v in self.layer_auc.items()}

    def train_auc(self) -> dict[int, float] | None:
        """Its training AUC by layer (None where the manifest does not say)."""
        return None if self.layer_train_auc is None else {int(k): v for k, v in self.layer_train_auc.items()}

    def hidden_norm_of(self, layer: int) -> float:
        """The layer's mean hidden norm: eta is a fraction of it, so one setting means the same at every layer."""
        return self.hidden_norm[str(layer)]

    def gate_offset_of(self, layer: int) -> float:
        """The compliance energy's calibrated offset at the layer: the energy gate compares E - offset."""
        return self.gate_offset[str(layer)]


# The recipe writes the gate's report after the sections that describe the artefact, before the integrity record.
_BEFORE_REPORT = frozenset(list(Manifest.model_fields)[: list(Manifest.model_fields).index("safety") + 1])


def _first_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        shown = f" (got {got!r})" if err["type"] != "missing" and len(repr(got)) < 60 else ""
        parts.append(f"{where + ': ' if where else ''}{err['msg']}{shown}")
    return "; ".join(parts)
