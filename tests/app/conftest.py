"""Fixtures of the web app tests: a clean environment per test (model, store, temporary folder), Streamlit's
caches cleared before and after each test, and helpers to drive the page with ``AppTest``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")


@pytest.fixture
def app_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary folder for the app's session workspaces (``tempfile.gettempdir()`` points to it),
    an empty passport store, and no model settings inherited from the developer's environment."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in ("CTPASSPORT_APP_MODEL", "CTPASSPORT_APP_ROOT", "TOTALSEG_WEIGHTS_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "no_totalseg_home"))
    monkeypatch.setenv("CTPASSPORT_DB", str(tmp_path / "store.sqlite"))
    return tmp


@pytest.fixture
def with_model(app_tmp: Path, standin_home: Path, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app finds the stand-in weights as "installed TotalSegmentator weights" (random labels)."""
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(standin_home))
    monkeypatch.setenv("CTPASSPORT_CACHE_DIR", str(onnx_cache))
    return standin_home


@pytest.fixture(autouse=True)
def clear_streamlit_caches():  # type: ignore[no-untyped-def]
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
