"""Shared test fixtures: the golden and fixture folders beside the repository."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIDMOE_SHARED_DIR", REPO.parent / "shared"))
GOLDEN_DIR = Path(os.environ.get("VIDMOE_GOLDEN_DIR", SHARED / "golden"))
LAYOUT_FIXTURE = SHARED / "fixtures" / "wan22_checkpoint_layout.json"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def layout_fixture():
    import json

    if not LAYOUT_FIXTURE.exists():
        pytest.skip(f"checkpoint layout fixture not found at {LAYOUT_FIXTURE}")
    return json.loads(LAYOUT_FIXTURE.read_text())
