import os

import numpy as np
import pytest

from moegps.paths import data_root


@pytest.fixture
def rng():
    """Fresh random inputs each run (seed printed on failure by the assertion messages that use it)."""
    return np.random.default_rng()


@pytest.fixture(scope="session")
def shared():
    """The shared real data folder; CI must have it, elsewhere its absence skips."""
    root = data_root()
    if not (root / "mmlu").exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {root} (set MOEGPS_DATA)")
        pytest.skip(f"shared data not found at {root}")
    return root
