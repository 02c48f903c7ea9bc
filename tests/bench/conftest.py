"""A tiny model with the fast model's layout (118 classes, 3 mm, TotalSegmentator home) for quick benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory, onnx_cache: Path) -> Path:
    pytest.importorskip("torch")
    from ctpassport.bench.tiny import make_tiny_home

    return make_tiny_home(tmp_path_factory.mktemp("tiny_home"))
