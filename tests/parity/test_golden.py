"""Every file in the golden folder, dispatched on its `kind` to a check in golden_<area>.py.

A new golden file of a known kind is tested with no new code; an unknown kind fails loudly.
"""

import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import GOLDEN_DIR

HERE = Path(__file__).parent


def _load_checks() -> dict:
    checks = {}
    for path in sorted(HERE.glob("golden_*.py")):
        spec = importlib.util.spec_from_file_location(f"_golden_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        checks.update(module.CHECKS)
    return checks


CHECKS = _load_checks()
FILES = sorted(GOLDEN_DIR.glob("*.safetensors")) if GOLDEN_DIR.exists() else []


@pytest.mark.skipif(not FILES, reason=f"no golden files found in {GOLDEN_DIR}")
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_file(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    kind = meta.get("kind")
    assert kind in CHECKS, (
        f"{path.name}: no parity check for kind {kind!r}; known: {sorted(CHECKS)}"
    )
    CHECKS[kind](path, meta)
