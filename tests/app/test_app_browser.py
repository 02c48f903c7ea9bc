"""The web app in a real browser: ``ctpassport app --port P`` in a subprocess, Debian's chromium driven by
Playwright. Uploads a phantom, waits for the segmentation, checks the organ table and the viewer (hovering names
the organ), shows clear messages for bad uploads, registers a phantom follow-up, and saves screenshots
(``app_upload.png``, ``app_registration.png``) in the test's output folder.

Chromium is never downloaded: the test uses ``/usr/bin/chromium`` (or ``chromium`` on the PATH) and skips
without it (``CTPASSPORT_REQUIRE_ALL=1`` in CI turns that skip into a failure)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Seconds to wait for a segmentation in the browser (one network patch with stand-in weights: ~20 s here).
SEGMENT_TIMEOUT_S = 400


def chromium_path() -> str:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    pytest.skip("chromium is not installed (Debian package `chromium`)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ctpassport_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("ctpassport")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from ctpassport.cli import main; main()"]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """``ctpassport app`` on a free loopback port with stand-in weights (or the demo model when it exists), its
    own temporary folder and passport store; stopped with SIGTERM at the end (the session folders must go)."""
    chromium_path()
    pytest.importorskip("playwright.sync_api")
    base = tmp_path_factory.mktemp("app_server")
    tmp = base / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTPASSPORT_APP_", "TOTALSEG_"))}
    env.update(
        TMPDIR=str(tmp), CTPASSPORT_DB=str(base / "store.sqlite"), TOTALSEG_HOME_DIR=str(base / "none")
    )
    cmd = ctpassport_cmd() + ["app", "--port", str(port := free_port())]
    from ctpassport.app.core import demo_model_dir

    if demo_model_dir() is not None:
        cmd += ["--model", str(demo_model_dir())]
        model = "demo"
    else:
        try:
            home = request.getfixturevalue("standin_home")
            env.update(
                TOTALSEG_HOME_DIR=str(home), CTPASSPORT_CACHE_DIR=str(request.getfixturevalue("onnx_cache"))
            )
            model = "standin"
        except pytest.skip.Exception:
            model = "none"
    log = open(base / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(
                f"ctpassport app exited with {proc.returncode}:\n{(base / 'server.log').read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url + "_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ctpassport app did not answer within 120 s")
        time.sleep(0.5)
    try:
        yield {"url": url, "tmp": tmp, "model": model, "proc": proc, "log": base / "server.log"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        log.close()
        leftovers = [p for p in tmp.rglob("*") if "ctpassport-app-" in str(p)]
        assert code == 0, (base / "server.log").read_text()[-3000:]
        assert leftovers == [], f"session folders left after the server stopped: {leftovers}"


@pytest.fixture
def page(server: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium_path(),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1600, "height": 1000},
        )
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server["url"])
        pg.get_by_text("Load a study", exact=True).wait_for()
        try:
            yield pg
        finally:
            ctx.close()


def screenshot(pg: Any, path: Path, height: int = 2200) -> Path:
    """A tall screenshot of the page (Streamlit scrolls inside its main block, so grow the viewport)."""
    pg.set_viewport_size({"width": 1600, "height": height})
    time.sleep(2.0)
    pg.screenshot(path=str(path), full_page=True)
    return path


def upload_file(pg: Any, path: Path) -> None:
    pg.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(str(path))


def alerts(pg: Any) -> list[str]:
    return [t.strip() for t in pg.locator("[data-testid='stAlert']").all_inner_texts()]


# ------------------------------------------------------------------------------------------------
def test_upload_phantom_segment_and_view(server: dict[str, Any], page: Any, tmp_path: Path) -> None:
    if server["model"] == "none":
        pytest.skip("no model for the browser test (needs torch for the stand-in weights)")
    from ctpassport.app import demo

    ct = tmp_path / "phantom_ct.nii.gz"
    ct.write_bytes(demo.nifti_bytes_of(demo.phantom_study(1, 3.0)))
    upload_file(page, ct)
    page.get_by_text("Organs", exact=True).first.wait_for(timeout=SEGMENT_TIMEOUT_S * 1000)
    assert not [a for a in alerts(page) if "error" in a.lower()], alerts(page)
    metric = page.locator("[data-testid='stMetric']").filter(has_text="Organs").first
    n_organs = int(metric.locator("[data-testid='stMetricValue']").inner_text())
    assert n_organs > 0
    assert (
        page.get_by_text(
            re.compile(rf"Segmented phantom_ct\.nii\.gz: {n_organs} organs in [0-9.]+ s")
        ).count()
        == 1
    )
    # the organ table: one row per organ (glide grid's accessible table: header + rows)
    page.locator("[data-testid='stDataFrame']").first.scroll_into_view_if_needed()
    grid = page.locator("[data-testid='stDataFrame'] table[role='grid']").first  # hidden, for screen readers
    assert int(grid.get_attribute("aria-rowcount")) == n_organs + 1
    headers = " ".join(page.locator("[data-testid='stDataFrame']").first.locator("th").all_inner_texts())
    for col in ("organ", "volume (ml)", "mean HU", "truncated"):
        assert col in headers
    assert page.get_by_text(f"{n_organs} of {n_organs} organs").is_visible()
    # the viewer: three planes, each a picture; hovering over the axial slice names what is there
    charts = page.locator("[data-testid='stPlotlyChart']")
    assert charts.count() >= 3
    for i in range(3):
        assert charts.nth(i).locator("image").count() >= 1
    axial = charts.nth(0)
    axial.scroll_into_view_if_needed()
    box = axial.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    hover = page.locator(".hoverlayer .hovertext").first
    hover.wait_for(timeout=10_000)
    assert "HU" in (hover.text_content() or "")
    # moving the axial slider (keyboard on its thumb) shows another slice
    thumb = (
        page.locator("[data-testid='stSlider']").filter(has_text="Axial slice").locator("input[type='range']")
    )
    before = int(thumb.input_value())
    total = int(thumb.get_attribute("max"))
    thumb.focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.get_by_text(f"Axial {before - 2}/{total}").wait_for(timeout=30_000)
    assert int(thumb.input_value()) == before - 2
    assert page.get_by_text("Coronal slice").is_visible() and page.get_by_text("Sagittal slice").is_visible()
    shot = screenshot(page, tmp_path / "app_upload.png")
    print(f"screenshot: {shot} (model: {server['model']})")
    assert shot.stat().st_size > 50_000


def _bad_files(folder: Path) -> list[tuple[Path, str]]:
    import nibabel as nib

    text = folder / "report.nii.gz"
    text.write_text("this is a text file, not an image\n")
    flat = folder / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 50), np.int16), np.eye(4)), str(flat))
    empty = folder / "series.zip"
    buf = io.BytesIO()
    zipfile.ZipFile(buf, "w").close()
    empty.write_bytes(buf.getvalue())
    return [
        (text, "report.nii.gz: named .gz but is not gzip-compressed"),
        (flat, "slice.nii.gz: is 2-D with shape (40, 50), expected a 3-D volume"),
        (empty, "series.zip: this zip archive holds no DICOM files"),
    ]


def test_bad_uploads_show_clear_messages(server: dict[str, Any], page: Any, tmp_path: Path) -> None:
    for path, expected in _bad_files(tmp_path):
        upload_file(page, path)
        page.get_by_text(expected).wait_for(timeout=30_000)
        texts = alerts(page)
        assert any(expected in t for t in texts), texts
        assert not any("Traceback" in t for t in texts)
    assert page.locator("[data-testid='stException']").count() == 0
    shot = screenshot(page, tmp_path / "app_bad_upload.png", height=1000)
    print(f"screenshot: {shot}")


def test_phantom_registration_in_browser(server: dict[str, Any], page: Any, tmp_path: Path) -> None:
    page.get_by_text("Demo phantom", exact=True).click()
    page.get_by_role("button", name="Generate phantom").wait_for()
    page.locator("summary").filter(has_text="Settings").click()
    toggle = page.locator("[data-testid='stCheckbox']").filter(
        has_text="Phantoms: use their reference labels"
    )
    toggle.locator("label").click()
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Generate phantom").click()
    page.get_by_text("Phantom 1 baseline (3 mm)").first.wait_for()
    page.get_by_role("tab", name="Registration").click()
    page.get_by_role("button", name="Register").click()
    page.get_by_text("TRE (true error)").wait_for(timeout=120_000)
    tre = page.locator("[data-testid='stMetric']").filter(has_text="TRE (true error)")
    value = float(tre.locator("[data-testid='stMetricValue']").inner_text().split()[0])
    assert 0.0 < value < 3.0
    assert page.locator("[data-testid='stPlotlyChart']").filter(has_text="Centroid residual").count() == 1
    shot = screenshot(page, tmp_path / "app_registration.png", height=2600)
    print(f"screenshot: {shot}")
