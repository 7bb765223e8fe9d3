"""What the integration tests on the no-op echo pipeline (pipelines/echo.yaml) share:
its spec, a one-replica operator plan, and random PNG pages."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "echo.yaml"
PLAN = """
pipeline: echo
allocations:
  - {task: a, variant: echo_a, batch_size: 8, replicas: 1}
  - {task: b, variant: echo_b, batch_size: 8, replicas: 1}
"""


def png(side: int, seed: int) -> bytes:
    """A ``side`` x ``side`` PNG of random pixels (seeded)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
