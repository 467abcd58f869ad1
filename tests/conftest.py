"""Fixtures: tiny models of every family, and the skip for tests that need the benchmark files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers as `helpers`

from els.core.models import LoadedModel  # noqa: E402
from els.data.prompts import data_dir  # noqa: E402

from helpers import FAMILIES, tiny_model  # noqa: E402


def _has_data() -> bool:
    try:
        return data_dir().is_dir()
    except FileNotFoundError:
        return False


def pytest_collection_modifyitems(config, items) -> None:
    if _has_data():
        return
    skip = pytest.mark.skip(
        reason="needs the benchmark files: set ELS_DATA to a folder with xstest/, orbench/, "
        "oktest/, harmful/, harmless/ (or put them in ../shared/data)"
    )
    for item in items:
        if "needs_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=FAMILIES)
def tiny(request) -> LoadedModel:
    return tiny_model(request.param)
