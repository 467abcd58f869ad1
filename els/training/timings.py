"""`els run`'s stage times, OUT/timings.json: one field per stage, in the order run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from els.core.io import read_json_object, write_atomic


@dataclass
class Timings:
    """Seconds per stage of `els run` (the file rounds them to 0.1 s)."""

    inputs_s: float = 0.0  # reading every prompt set, before the model loads
    load_s: float = 0.0
    collect_s: float = 0.0
    gate_s: float = 0.0
    train_s: float = 0.0
    validate_s: float = 0.0

    def stages(self) -> dict[str, float]:
        """Stage name (without `_s`) -> seconds, in the order run."""
        return {name.removesuffix("_s"): seconds for name, seconds in asdict(self).items()}

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps({k: round(v, 1) for k, v in asdict(self).items()}, indent=2))

    @classmethod
    def read(cls, path: Path) -> Timings:
        return cls(**read_json_object(path, "a timings file"))
