import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden"


def golden_taps(entry: str) -> Path:
    """golden/taps/{entry}.safetensors, e.g. "tiny-qwen2/exact/fox"."""
    p = GOLDEN / "taps" / f"{entry}.safetensors"
    assert p.is_file(), f"{p} missing: the kit's tests read the committed goldens"
    return p


def require_or_skip(reason: str):
    """Skip with a reason, or fail when LOCKSTEP_REQUIRE_HF=1 (CI that must run the HF checks)."""
    if os.environ.get("LOCKSTEP_REQUIRE_HF") == "1":
        pytest.fail(f"LOCKSTEP_REQUIRE_HF=1 but {reason}")
    pytest.skip(reason)
