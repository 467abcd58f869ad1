"""The schema of an artefact's manifest (els.json): every field the library reads, typed and range-checked
on load, so that an edited field is one line naming the file and the field, never a traceback later on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from els.steering.settings import MAX_ENERGY_GATE, MAX_ETA, MAX_STEPS

Number = StrictFloat | StrictInt
Finite = Annotated[Number, Field(allow_inf_nan=False)]
Layer = Annotated[StrictInt, Field(ge=0)]
# Upper bounds no real artefact reaches (the largest open models have hidden size 16,384 and 126 layers; the
# paper's widths are 2,048 at most), so that an edited number is refused, not allocated or computed with.
MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_WIDTH, MAX_WIDTHS = 65536, 1024, 16384, 16
Bounded = Annotated[Finite, Field(ge=-1e6, le=1e6)]  # a layer's mean hidden norm or energy offset


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields the library does not read are the writer's business


class EnergyFields(_Open):
    widths: list[Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]] = Field(min_length=1, max_length=MAX_WIDTHS)
    dropout: Annotated[Number, Field(ge=0, lt=1)]


class SteerFields(_Open):
    """The `steer` section: the steered layers and a `SteerSettings` (older spellings still read)."""

    layers: list[Layer] = Field(min_length=1)
    eta: Annotated[Finite, Field(ge=0, le=MAX_ETA)]
    steps: Annotated[StrictInt, Field(ge=0, le=MAX_STEPS)]
    energy_gate: Annotated[Finite, Field(ge=-MAX_ENERGY_GATE, le=MAX_ENERGY_GATE)] | None = None
    threshold: Finite | None = None  # energy_gate's name before two-sided steering
    gate: Finite | None = None  # and before format 1.1
    harm_gate: Annotated[Number, Field(ge=0, le=1)] | None = None
    flagged: Literal["refuse", "leave"] = "leave"
    refuse_eta: Annotated[Finite, Field(ge=0, le=MAX_ETA)] | None = None
    positions: Literal["last", "prompt"] = "last"
    project: StrictBool = False


class SafetyFields(_Open):
    """The safety energy (two-sided artefacts): its per-layer validation AUC of safe refusal against jailbreak."""

    layer_auc: dict[str, Annotated[Finite, Field(ge=0, le=1)]]


class ManifestFields(_Open):
    format_version: Literal[1, 2]
    base_model: str
    model_fingerprint: str
    hidden_size: Annotated[StrictInt, Field(ge=1, le=MAX_HIDDEN_SIZE)]
    num_layers: Annotated[StrictInt, Field(ge=1, le=MAX_LAYERS)]
    trained_layers: list[Layer] = Field(min_length=1)
    hidden_norm: dict[str, Annotated[Bounded, Field(gt=0)]]
    gate_offset: dict[str, Bounded]
    energy: EnergyFields
    steer: SteerFields
    safety: SafetyFields | None = None

    @model_validator(mode="after")
    def _layers_agree(self) -> ManifestFields:
        trained = self.trained_layers
        if len(set(trained)) != len(trained) or max(trained) >= self.num_layers:
            raise ValueError(f"trained_layers {trained} must be distinct layers below num_layers {self.num_layers}")
        if len(set(self.steer.layers)) != len(self.steer.layers):
            raise ValueError(f"steer.layers {self.steer.layers} name a layer twice")
        if stray := [x for x in self.steer.layers if x not in trained]:
            raise ValueError(f"steer.layers {stray} are not among trained_layers {trained}")
        for name in ("hidden_norm", "gate_offset"):
            if missing := [x for x in trained if str(x) not in getattr(self, name)]:
                raise ValueError(f"{name} lacks trained layers {missing}")
        return self


def check_manifest(manifest: dict, mpath: Path) -> None:
    """Raise ValueError, one line naming `mpath` and the first bad fields, unless `manifest` fits the schema."""
    try:
        ManifestFields.model_validate(manifest)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:3]:
            where = ".".join(str(x) for x in err["loc"])
            got = err.get("input")
            shown = f" (got {got!r})" if err["type"] != "missing" and len(repr(got)) < 60 else ""
            parts.append(f"{where + ': ' if where else ''}{err['msg']}{shown}")
        raise ValueError(f"{mpath}: {'; '.join(parts)}") from None
