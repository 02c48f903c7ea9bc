"""Fixtures of the registration tests."""

from __future__ import annotations

import numpy as np
import pytest
from register_helpers import ellipsoid_scene


@pytest.fixture(scope="session")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A small label map of non-overlapping ellipsoids (4 mm voxels) and its affine."""
    return ellipsoid_scene()
