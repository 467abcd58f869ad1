"""Typed records keep their files' formats."""

import json

import pytest

from els.training.timings import Timings


def test_timings_file_format_and_round_trip(tmp_path):
    t = Timings(inputs_s=0.04, load_s=1.26, collect_s=30.0, gate_s=2.0, train_s=12.345, validate_s=5.0)
    t.write(tmp_path / "timings.json")
    on_disk = json.loads((tmp_path / "timings.json").read_text())
    # What `els run` has always written (tests/test_end_to_end.py, benchmarks/first_run.py read it).
    assert on_disk == {
        "inputs_s": 0.0,
        "load_s": 1.3,
        "collect_s": 30.0,
        "gate_s": 2.0,
        "train_s": 12.3,
        "validate_s": 5.0,
    }
    assert Timings.read(tmp_path / "timings.json") == Timings(**on_disk)
    assert list(t.stages()) == ["inputs", "load", "collect", "gate", "train", "validate"]
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="timings"):
        Timings.read(tmp_path / "bad.json")
