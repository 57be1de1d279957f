"""Pictures for the engine tests (the tiny model fixtures live in tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def small_image() -> Image.Image:
    """A 96x64 RGB picture with structure (a gradient and a square), not flat noise."""
    y, x = np.mgrid[0:64, 0:96]
    pixels = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    pixels[20:40, 30:60] = (250, 40, 40)
    return Image.fromarray(pixels, "RGB")
