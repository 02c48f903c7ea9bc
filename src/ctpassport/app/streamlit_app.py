"""The ctpassport web app page (run by ``ctpassport app`` through ``streamlit run``).

Layout: a sidebar to load a study (upload, demo phantom, server folder) and the settings; the main area
shows the study, the segmentation (progress, timings, model), the slice viewer with the organ table, the
passport pictures, registration and downloads. All logic lives in :mod:`ctpassport.app.core` and its
siblings; this script only draws. Errors are shown as messages in the page, never as tracebacks.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, cast

import streamlit as st

from ctpassport import __version__
from ctpassport.app import core, downloads, viewer
from ctpassport.app.workspace import Workspace
from ctpassport.errors import CTPassportError

LOG = logging.getLogger("ctpassport.app")
PLANE_KEYS = {p: f"slice_{p}" for p in viewer.PLANES}
CANONICAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
VIEWER_CONFIG = {
    "displaylogo": False,
    "scrollZoom": True,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d"],
}

st.set_page_config(
    page_title="ctpassport", page_icon=":material/radiology:", layout="wide", initial_sidebar_state="expanded"
)
st.markdown(
    """<style>
    .block-container {padding-top: 2.2rem; padding-bottom: 2rem; max-width: 1500px;}
    div[data-testid="stMetricValue"] {font-size: 1.35rem;}
    .ctp-sub {color: #9aa4b2; font-size: 0.9rem; margin-top: -0.6rem;}
    </style>""",
    unsafe_allow_html=True,
)


# ------------------------------------------------------------------------------------------------
# session state and helpers
# ------------------------------------------------------------------------------------------------
def state() -> Any:
    ss = st.session_state
    if "ws" not in ss:
        ss.ws = Workspace("session")
        ss.study = None
        ss.seg = None
        ss.reg = None
        ss.upload_seen = None
        ss.load_n = 0
    return ss


def report(exc: BaseException, what: str, where: Any = None) -> None:
    """Show an error as one message in the page (the traceback goes to the server log only)."""
    box = where if where is not None else st
    if isinstance(exc, CTPassportError):
        box.error(f"{what}: {exc}", icon=":material/error:")
    elif isinstance(exc, MemoryError):
        box.error(f"{what}: out of memory", icon=":material/error:")
    else:
        LOG.error("%s failed:\n%s", what, traceback.format_exc())
        first = (str(exc).splitlines() or [""])[0][:300]
        box.error(f"{what}: unexpected error ({type(exc).__name__}: {first})", icon=":material/error:")


def max_upload_bytes() -> int:
    try:
        mb = int(st.get_option("server.maxUploadSize"))
    except Exception:  # noqa: BLE001 - option missing in odd set-ups
        mb = core.DEFAULT_MAX_UPLOAD_MB
    return mb * 2**20


def drop_registration(ss: Any) -> None:
    """Forget the registration on the page and remove its files (and its follow-up's) from the workspace."""
    reg = ss.reg
    if reg is not None:
        ss.ws.remove(reg.folder)
        if reg.moving.study is not None and reg.moving.study.folder is not None:
            ss.ws.remove(reg.moving.study.folder)
    ss.reg = None
    ss.reg_views = None


def involves_study(reg: Any, study: Any) -> bool:
    """Whether registration ``reg`` has ``study`` (the page's current study) as its baseline or follow-up."""
    return reg is not None and study is not None and any(s is study for s in (reg.fixed.study, reg.moving.study))


def set_study(ss: Any, study: core.Study) -> None:
    """Make ``study`` the current one: forget the previous study, its segmentation and registration (and
    their files in the workspace), reset the sliders."""
    old = ss.study
    if old is not None and old.folder is not None:
        ss.ws.remove(old.folder)
    drop_registration(ss)
    ss.study = study
    ss.seg = None
    ss.view = viewer.canonical_view(study.image.data, study.image.affine)
    ss.load_n += 1
    for key in PLANE_KEYS.values():
        ss.pop(key, None)


@st.cache_resource(show_spinner=False)
def segmentation_lock() -> threading.Lock:
    """One segmentation at a time on this server (sessions share the inference session and the CPU)."""
    return threading.Lock()


@st.cache_data(show_spinner=False)
def backends_here() -> list[str]:
    from ctpassport.segment.backends import available_backends

    return available_backends()


@st.cache_resource(show_spinner=False, max_entries=2)
def get_segmenter(model_path: str, backend: str | None) -> Any:
    """One inference session per model and backend, shared by all sessions of this server."""
    from ctpassport.segment.pipeline import Segmenter

    return Segmenter(model_path, backend=backend)


def segment_with_progress(study: core.Study, settings: dict[str, Any]) -> core.SegmentationRun | None:
    """Segment ``study`` showing a status box with a progress bar; None (and a message) when it fails."""
    if settings.get("reference") and study.truth_labels is not None:
        run = core.reference_run(study)
        st.toast(f"{study.name}: phantom reference labels ({len(run.passport.organs)} organs)")
        return run
    box = st.status(f"Segmenting {study.name}", expanded=True)
    with box:
        try:
            choice = core.choose_model()
            st.write(
                f"Model: {choice.description}. The first run on this server prepares it (ONNX export, "
                "inference session); later runs reuse it."
            )
            t0 = time.perf_counter()
            seg = get_segmenter(str(choice.path), settings.get("backend"))
            load_s = time.perf_counter() - t0
            total = core.estimate_tiles(study.image, seg)
            bar = st.progress(0.0, text=f"Inference: 0 of {total} patches")
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                bar.progress(
                    min(done[0] / max(total, 1), 1.0),
                    text=f"Inference: {done[0]} of {max(total, done[0])} patches",
                )

            lock = segmentation_lock()
            if not lock.acquire(blocking=False):
                bar.progress(0.0, text="Waiting for another segmentation on this server to finish...")
                lock.acquire()
            try:
                run = core.segment_study(
                    seg, study, model_kind=choice.kind, grid=settings.get("grid", "output"), progress=tick
                )
            finally:
                lock.release()
            bar.progress(1.0, text=f"Inference: {run.n_tiles} of {run.n_tiles} patches")
            run.timings = {"model load": load_s, **run.timings}
            run.model_path = str(choice.path)
            box.update(
                label=f"Segmented {study.name}: {len(run.passport.organs)} organs in "
                f"{sum(run.timings.values()):.1f} s",
                state="complete",
                expanded=False,
            )
            return run
        except Exception as exc:  # noqa: BLE001 - shown in the page
            box.update(label=f"Segmentation of {study.name} failed", state="error", expanded=True)
            report(exc, "Segmentation")
            return None


def run_segmentation(ss: Any, settings: dict[str, Any]) -> bool:
    """Segment the current study; True when it worked. A registration of the study's earlier segmentation is
    dropped: its labels, passport and residuals are not this run's."""
    run = segment_with_progress(ss.study, settings)
    if run is None:
        return False
    if involves_study(ss.reg, ss.study):
        drop_registration(ss)
    run.settings = core.run_settings(settings, ss.study)  # what the page compares the settings with later
    ss.seg = run
    ss.view = ss.view.with_labels(viewer.canonical_labels(run.labels, ss.study.image.affine))
    for key in PLANE_KEYS.values():
        ss.pop(key, None)
    return True


# ------------------------------------------------------------------------------------------------
# sidebar: load a study
# ------------------------------------------------------------------------------------------------
def sidebar(ss: Any, alerts: Any) -> dict[str, Any]:
    """The sidebar; its errors go to ``alerts`` (a container at the top of the main area)."""
    from ctpassport.config import Config

    settings: dict[str, Any] = {}
    with st.sidebar:
        st.markdown("## :material/radiology: ctpassport")
        st.caption(f"CT segmentation, anatomical passports and registration · v{__version__}")
        try:
            root = Config.from_env().app_root
        except CTPassportError as exc:
            report(exc, "Settings", alerts)
            root = None
        sources = ["Upload", "Demo phantom"] + (["Server folder"] if root is not None else [])
        source = st.radio("Load a study", sources, key="source", horizontal=True)
        if source == "Upload":
            up = st.file_uploader(
                "CT: NIfTI (.nii, .nii.gz) or a zip of a DICOM series",
                key="upload",
                help=f"Up to {max_upload_bytes() // 2**20} MB. Files stay in a temporary "
                "folder of this session, removed when it ends.",
            )
            if up is not None and ss.upload_seen != up.file_id:
                ss.upload_seen = up.file_id
                try:
                    with st.spinner(f"Reading {up.name}..."):
                        study = core.load_upload(up.name, up, ss.ws, max_bytes=max_upload_bytes())
                    set_study(ss, study)
                    ss.auto_segment = True
                except Exception as exc:  # noqa: BLE001
                    ss.upload_error = exc
                else:
                    ss.upload_error = None
            if up is None:
                ss.upload_seen = None
                ss.upload_error = None
            if ss.get("upload_error") is not None:
                report(ss.upload_error, "Upload", alerts)
        elif source == "Demo phantom":
            from ctpassport.app import demo

            seed = st.number_input(
                "Phantom seed", min_value=0, max_value=9999, value=1, step=1, key="ph_seed"
            )
            spacing = st.select_slider(
                "Voxel size (mm)", options=demo.SPACINGS, value=demo.DEFAULT_SPACING, key="ph_spacing"
            )
            field = st.selectbox(
                "Field of view", demo.FIELDS, key="ph_field",
                help="The upper abdomen fits one network patch (fast); chest to pelvis takes several.",
            )
            if st.button("Generate phantom", key="ph_go", icon=":material/science:", width="stretch"):
                try:
                    with st.spinner("Rendering the phantom..."):
                        study = demo.phantom_study(int(seed), float(spacing), field=field)
                    set_study(ss, study)
                    ss.auto_segment = True
                except Exception as exc:  # noqa: BLE001
                    report(exc, "Phantom", alerts)
        else:
            files = core.server_studies(root) if root is not None else []
            if not files:
                st.info(f"No CT files found under {root}.")
            else:
                assert root is not None  # files is empty without a server root
                rel = st.selectbox("CT under the server folder", files, key="server_pick")
                if st.button("Open", key="server_go", icon=":material/folder_open:", width="stretch"):
                    try:
                        with st.spinner(f"Reading {rel}..."):
                            path = core.resolve_under_root(root, rel)
                            study = core.load_path(path, display_name=rel, source="server")
                        set_study(ss, study)
                        ss.auto_segment = True
                    except Exception as exc:  # noqa: BLE001
                        report(exc, "Open", alerts)
        st.divider()
        with st.expander("Settings", icon=":material/tune:"):
            settings["auto"] = st.toggle("Segment right after loading", value=True, key="auto")
            settings["grid"] = st.radio(
                "Passport grid",
                ["output", "model"],
                key="pgrid",
                horizontal=True,
                help="output: the study's own grid (volumes and HU at full resolution); "
                "model: the 3 mm grid the network ran on.",
            )
            backend = st.selectbox(
                "Inference backend",
                ["auto"] + backends_here(),
                key="backend",
                help="auto: the fastest backend that keeps parity on this machine",
            )
            settings["backend"] = None if backend == "auto" else backend
            settings["reference"] = st.toggle(
                "Phantoms: use their reference labels",
                value=False,
                key="reference",
                help="Skip the model for demo phantoms and use the labels they were "
                "drawn with (exact passports, e.g. to try registration).",
            )
        try:
            choice = core.choose_model()
            st.caption(f"Model: {choice.description}")
        except CTPassportError:
            st.caption(":material/warning: No segmentation model found (see the main page).")
    return settings


# ------------------------------------------------------------------------------------------------
# main area
# ------------------------------------------------------------------------------------------------
def study_header(ss: Any) -> None:
    study = ss.study
    st.markdown(f"### {study.name}")
    st.markdown(
        f"<div class='ctp-sub'>{study.summary} · source: {study.source}</div>", unsafe_allow_html=True
    )


def segmentation_summary(ss: Any) -> None:
    run = ss.seg
    cols = st.columns(5)
    cols[0].metric("Organs", len(run.passport.organs))
    cols[1].metric("Labelled volume", f"{sum(o.volume_mm3 for o in run.passport.organs) / 1e6:.2f} l")
    cols[2].metric("Total time", f"{sum(run.timings.values()):.1f} s")
    if run.model_kind == "reference":
        cols[3].metric("Labels", "phantom reference", help="the labels the phantom was drawn with (no model)")
    else:
        cols[3].metric("Backend", run.backend)
        cols[4].metric("Patches", run.n_tiles, help="network patches of the sliding window")
    stages = " · ".join(f"{k} {v:.2f} s" for k, v in run.timings.items())
    what = {
        "installed": "TotalSegmentator fast-model weights",
        "demo": "ctpassport demo model (phantoms only)",
        "configured": "configured model",
        "reference": "no model",
    }.get(run.model_kind, run.model_kind)
    st.caption(f"Model: {run.model_id} ({what}) · timings: {stages}")
    if run.passport.warnings:
        for w in run.passport.warnings:
            st.warning(w)


@st.fragment
def viewer_panel(ss: Any, *, key_prefix: str = "", fusion: Any = None, view: Any = None) -> None:
    """The three planes with a slider each, window preset, overlay opacity and legend."""
    view = view if view is not None else ss.view
    c1, c2, c3 = st.columns([2, 3, 1])
    preset = (
        c1.segmented_control(
            "CT window", list(viewer.WINDOWS), default="Soft tissue", key=f"{key_prefix}window"
        )
        or "Soft tissue"
    )
    opacity = c2.slider(
        "Label opacity", 0.0, 1.0, 0.45, 0.05, key=f"{key_prefix}opacity", disabled=view.labels is None
    )
    c3.markdown(
        f"<div style='padding-top:1.9rem;color:#9aa4b2'>W {viewer.WINDOWS[preset][1]:.0f} / "
        f"L {viewer.WINDOWS[preset][0]:.0f}</div>",
        unsafe_allow_html=True,
    )
    start = viewer.best_slices(view)
    cursor = []
    for plane in ("sagittal", "coronal", "axial"):
        key = key_prefix + PLANE_KEYS[plane]
        n = view.n_slices(plane)
        if key in st.session_state and not 1 <= st.session_state[key] <= n:
            st.session_state.pop(key)
        cursor.append(int(st.session_state.get(key, start[CANONICAL_AXIS[plane]] + 1)) - 1)
    shown: set[int] = set()
    cols = st.columns(3)
    for col, plane in zip(cols, viewer.PLANES):
        key = key_prefix + PLANE_KEYS[plane]
        n = view.n_slices(plane)
        with col:
            idx = cursor[CANONICAL_AXIS[plane]]
            fig, ids = viewer.plane_figure(
                view,
                plane,
                idx,
                window=viewer.WINDOWS[preset],
                opacity=opacity,
                cursor=cast("tuple[int, int, int]", tuple(cursor)),  # one index per plane
                fusion=fusion,
            )
            shown.update(ids)
            st.plotly_chart(fig, key=f"{key_prefix}fig_{plane}", config=VIEWER_CONFIG)
            st.slider(f"{plane.capitalize()} slice", 1, max(n, 2), idx + 1, key=key, disabled=n < 2)
    if view.labels is not None and shown:
        st.markdown(viewer.legend_html(sorted(shown)), unsafe_allow_html=True)


@st.fragment
def organ_table(ss: Any) -> None:
    rows = core.organ_rows(ss.seg.passport)
    c1, c2, c3 = st.columns([3, 2, 2])
    text = c1.text_input("Filter organs", key="organ_filter", placeholder="e.g. lung, vertebrae, kidney")
    trunc = c2.selectbox(
        "Truncated organs",
        ["all", "only", "hide"],
        key="organ_trunc",
        help="truncated = touches the edge of the scan, may be incomplete",
    )
    sort = c3.selectbox("Sort by", list(core.SORT_KEYS), key="organ_sort")
    shown = core.filter_rows(rows, text, truncated=trunc, sort=sort)
    import pandas as pd

    df = pd.DataFrame(shown, columns=["id", "organ", "volume_ml", "mean_HU", "sd_HU", "voxels", "truncated"])
    st.dataframe(
        df,
        key="organ_df",
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * max(len(df), 1), 460),
        column_config={
            "id": st.column_config.NumberColumn("id", width="small"),
            "organ": st.column_config.TextColumn("organ", width="medium"),
            "volume_ml": st.column_config.NumberColumn("volume (ml)", format="%.1f"),
            "mean_HU": st.column_config.NumberColumn("mean HU", format="%.0f"),
            "sd_HU": st.column_config.NumberColumn("SD HU", format="%.0f"),
            "voxels": st.column_config.NumberColumn("voxels", format="%d"),
            "truncated": st.column_config.CheckboxColumn("truncated", help="touches the scan's edge"),
        },
    )
    st.caption(f"{len(shown)} of {len(rows)} organs")


def passport_tab(ss: Any) -> None:
    from ctpassport.app import pictures

    run = ss.seg
    passport = run.passport
    if not passport.organs:
        st.info("The segmentation holds no organs: nothing to draw.")
        return
    if run.figures is None:
        run.figures = pictures.passport_figures(passport)
    figs = run.figures
    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(figs["map"], key="passport_3d", config={"displaylogo": False})
    with right:
        st.plotly_chart(figs["volumes"], key="passport_volumes", config={"displaylogo": False})
    with st.expander("Spine", icon=":material/accessibility_new:"):
        st.plotly_chart(figs["spine"], key="passport_spine", config={"displaylogo": False})
    with st.expander("Add to the passport store", icon=":material/database:"):
        st.caption(
            f"Store: {core.store_label()}. The same CT is "
            "stored once; stored passports can be registered later without their images."
        )
        c1, c2 = st.columns(2)
        patient = c1.text_input("Patient id (optional)", key="store_patient")
        date = c2.text_input("Study date YYYY-MM-DD (optional)", key="store_date")
        if st.button("Add to the store", key="store_add", icon=":material/add:"):
            try:
                rec, new = core.add_to_store(ss.study, run, patient_id=patient, study_date=date)
                st.success(
                    f"{'Added' if new else 'Already stored'}: study {rec.study_key} ({rec.n_organs} organs)"
                )
            except Exception as exc:  # noqa: BLE001
                report(exc, "Passport store")


def downloads_tab(ss: Any) -> None:
    study, run = ss.study, ss.seg
    stem = downloads.stem_of(study.name)
    st.markdown("Files are made when you click.")
    reg = ss.reg if involves_study(ss.reg, study) else None  # (a store-vs-store one is not this study's)
    # (label, bytes maker, file name, MIME type, widget key, icon, disabled reason)
    buttons = [
        ("Label map (NIfTI)", lambda: downloads.labels_nifti(run.labels, study.image), f"{stem}_seg.nii.gz",
         "application/gzip", "dl_labels", ":material/download:", None),
        ("Masks per class (zip)", lambda: downloads.masks_zip(run.labels, study.image), f"{stem}_masks.zip",
         "application/zip", "dl_masks", ":material/download:", None),
        ("Passport (JSON)", lambda: downloads.passport_json(run.passport), f"{stem}_passport.json",
         "application/json", "dl_passport", ":material/download:", None),
        ("Transform files (zip)", (lambda: downloads.folder_zip(reg.folder)) if reg else b"",
         f"{stem}_registration.zip", "application/zip", "dl_transform", ":material/download:",
         None if reg else ("The registration on the page does not involve this study" if ss.reg is not None
                          else "Run a registration first")),
        ("Report (HTML)", lambda: downloads.report_html(study, run, reg), f"{stem}_report.html", "text/html",
         "dl_report", ":material/description:", None),
        ("Organ table (CSV)", lambda: downloads.organs_csv(run.passport), f"{stem}_organs.csv", "text/csv",
         "dl_csv", ":material/table:", None),
    ]
    for i, (label, data, file_name, mime, key, icon, why_disabled) in enumerate(buttons):
        if i % 3 == 0:
            c = st.columns(3)
        c[i % 3].download_button(
            label, data=data, file_name=file_name, mime=mime, key=key, on_click="ignore", icon=icon,
            width="stretch", disabled=why_disabled is not None, help=why_disabled,
        )
    st.caption(
        "Label maps and masks are on the study's own grid (its affine and header), TotalSegmentator's class "
        "ids and names. Transforms map baseline points to follow-up points (see registration.json)."
    )


def _store_options() -> tuple[dict[str, Any], str | None]:
    """``{label: record}`` of the passport store's studies, and a problem message (or None)."""
    try:
        recs = core.store_records()
    except Exception as exc:  # noqa: BLE001 - an unreachable store must not break the page
        return {}, f"Passport store unavailable: {exc}"
    out = {}
    for r in recs:
        bits = [r.study_key] + [b for b in (r.patient_id, r.study_date) if b] + [f"{r.n_organs} organs"]
        out[f"Store: {' · '.join(bits)}"] = r
    return out, None


def _side_from_store(label: str, rec: Any) -> Any:
    from ctpassport.app.registration import Side

    return Side(name=label.removeprefix("Store: "), passport=rec.load_passport(), kind="store")


def registration_tab(ss: Any, settings: dict[str, Any]) -> None:
    from ctpassport.app import demo
    from ctpassport.app.registration import Side, check_pair, run_registration

    st.markdown(
        "Register a **follow-up** scan to a **baseline** from their passports (organ centroids, axes and "
        "surfaces; no intensity matching). The transform maps baseline points to follow-up points."
    )
    store, store_problem = _store_options()
    if store_problem:
        st.caption(store_problem)
    current = f"Current study: {ss.study.name}"
    fu_opts = (["Phantom follow-up (known motion)"] if ss.study.source == "demo" else []) + [
        "Upload a follow-up"
    ]
    c1, c2, c3 = st.columns([4, 4, 2])
    base_pick = c1.selectbox("Baseline (fixed)", [current] + list(store), key="reg_base")
    fu_pick = c2.selectbox("Follow-up (moving)", fu_opts + list(store), key="reg_fu")
    tier = (
        c3.segmented_control("Tier", ["rigid", "deformable"], default="deformable", key="reg_tier") or "rigid"
    )
    fu_upload = None
    if fu_pick == "Upload a follow-up":
        fu_upload = st.file_uploader(
            "Follow-up CT: NIfTI (.nii, .nii.gz) or a zip of a DICOM series", key="fu_upload"
        )
    go = st.button(
        "Register",
        type="primary",
        key="reg_go",
        icon=":material/compare_arrows:",
        disabled=fu_pick == "Upload a follow-up" and fu_upload is None,
    )
    if go:
        study = None
        try:
            if base_pick == current:
                fixed = Side(
                    name=ss.study.name, passport=ss.seg.passport, study=ss.study, labels=ss.seg.labels
                )
            else:
                fixed = _side_from_store(base_pick, store[base_pick])
            moving = None
            if fu_pick == "Phantom follow-up (known motion)":
                with st.spinner("Rendering the phantom's follow-up..."):
                    study = demo.follow_up_of(ss.study)
            elif fu_pick == "Upload a follow-up":
                assert fu_upload is not None  # the Register button is disabled without an upload
                study = core.load_upload(fu_upload.name, fu_upload, ss.ws, max_bytes=max_upload_bytes())
            else:
                moving = _side_from_store(fu_pick, store[fu_pick])
            if moving is None:
                assert study is not None  # the phantom and upload branches above both set it
                run = segment_with_progress(study, settings)
                if run is None:
                    if study.folder is not None:  # nothing of a failed run stays on disk
                        ss.ws.remove(study.folder)
                    return
                moving = Side(name=study.name, passport=run.passport, study=study, labels=run.labels)
            check_pair(fixed, moving)
            with st.spinner(f"Registering ({tier})..."):
                folder = ss.ws.path / f"registration-{ss.load_n}-{int(time.time() * 1000)}"
                reg = run_registration(fixed, moving, tier, folder)
            drop_registration(ss)
            ss.reg = reg
            for key in PLANE_KEYS.values():
                ss.pop("reg_" + key, None)
        except Exception as exc:  # noqa: BLE001
            if study is not None and study.folder is not None:  # the follow-up uploaded for this failed run
                ss.ws.remove(study.folder)
            report(exc, "Registration")
            if ss.reg is not None:  # what stays on the page is not the pair just asked for: say so
                st.caption(f"Shown below: the previous registration ({ss.reg.moving.name} → "
                           f"{ss.reg.fixed.name}, {ss.reg.tier}), unchanged by this failed one.")
    reg = ss.reg
    if reg is None:
        return
    registration_results(ss, reg)


def registration_results(ss: Any, reg: Any) -> None:
    import pandas as pd

    st.markdown(f"#### {reg.moving.name} → {reg.fixed.name} ({reg.tier})")
    m = reg.metrics()
    cols = st.columns(6)
    cols[0].metric("Organs used", m["organs used"])
    cols[1].metric("Rigid RMS residual", f"{m['rigid RMS residual (mm)']:.2f} mm")
    cols[2].metric("Rotation", f"{m['rotation (deg)']:.2f}°")
    cols[3].metric("Translation", f"{m['translation (mm)']:.1f} mm",
                   help="how far the rigid part moves the baseline's organs (at the mean of their centroids)")
    cols[4].metric("Time", f"{reg.seconds.get('register', 0.0):.2f} s")
    if reg.tre is not None:
        cols[5].metric(
            "TRE (true error)",
            f"{reg.tre['registered']['mean']:.2f} mm",
            delta=f"{reg.tre['registered']['mean'] - reg.tre['before']['mean']:.1f} mm vs before",
            delta_color="inverse",
        )
    else:
        cols[5].metric("TRE (true error)", "unknown", help="known only for phantom follow-ups")
    if reg.tre is not None:
        tre_df = pd.DataFrame(
            [
                {
                    "stage": k,
                    "mean (mm)": v["mean"],
                    "median (mm)": v["median"],
                    "p95 (mm)": v["p95"],
                    "max (mm)": v["max"],
                    "points": v["n"],
                }
                for k, v in reg.tre.items()
            ]
        )
        st.dataframe(
            tre_df,
            key="reg_tre",
            hide_index=True,
            width="content",
            column_config={
                c: st.column_config.NumberColumn(c, format="%.2f")
                for c in ("mean (mm)", "median (mm)", "p95 (mm)", "max (mm)")
            },
        )
    left, right = st.columns([3, 2])
    with left:
        df = pd.DataFrame(
            reg.residuals, columns=["id", "organ", "status", "weight", "centroid_mm", "surface_mm"]
        )
        st.dataframe(
            df,
            key="reg_residuals",
            hide_index=True,
            width="stretch",
            height=360,
            column_config={
                "centroid_mm": st.column_config.NumberColumn("centroid residual (mm)", format="%.2f"),
                "surface_mm": st.column_config.NumberColumn("surface distance (mm)", format="%.2f"),
            },
        )
    with right:
        st.plotly_chart(residual_chart(reg.residuals), key="reg_chart", config={"displaylogo": False})
    if not reg.has_images:
        st.info("One side comes from the passport store (no image): residuals only, no overlay.")
        return
    views = ss.get("reg_views")
    if views is None:
        fimg = reg.fixed.study.image
        base = viewer.canonical_view(fimg.data, fimg.affine)
        views = {
            "base": base,
            "fixed_labels": viewer.canonical_labels(reg.fixed.labels, fimg.affine)
            if reg.fixed.labels is not None
            else None,
            "warped": viewer.canonical_view(reg.warped.data, reg.warped.affine),
            "before": viewer.canonical_view(reg.before.data, reg.before.affine),
            "warped_labels": viewer.canonical_labels(reg.warped_labels, fimg.affine)
            if reg.warped_labels is not None
            else None,
        }
        ss.reg_views = views
    mode = (
        st.segmented_control(
            "Overlay",
            ["Fusion after", "Fusion before", "Warped follow-up", "Baseline"],
            default="Fusion after",
            key="reg_mode",
            help="Fusion: baseline in magenta, follow-up in green (grey where they agree).",
        )
        or "Fusion after"
    )
    labels_pick = st.radio(
        "Labels",
        ["none", "baseline", "warped follow-up"],
        horizontal=True,
        key="reg_labels",
        help="Label overlay on top of the images (none shows the fusion best).",
    )
    lab = {"baseline": views["fixed_labels"], "warped follow-up": views["warped_labels"], "none": None}[
        labels_pick
    ]
    image = "warped" if mode == "Warped follow-up" else "base"
    fusion = {"Fusion after": views["warped"], "Fusion before": views["before"]}.get(mode)
    if (image, labels_pick) not in views:  # made once per registration (keeps the slider start cheap)
        views[(image, labels_pick)] = views[image].with_labels(lab)
    viewer_panel(ss, key_prefix="reg_", fusion=fusion, view=views[(image, labels_pick)])


RESIDUAL_COLORS = {"used": "#4fb3bf", "downweighted": "#f5b041", "dropped": "#e74c3c"}


def residual_chart(rows: list[dict[str, Any]]) -> Any:
    """Bar chart of the centroid residual per organ (mm), coloured by how the organ took part in the fit."""
    import plotly.graph_objects as go

    rows = [r for r in rows if r["centroid_mm"] is not None]
    rows = sorted(rows, key=lambda r: r["centroid_mm"])[-40:]
    fig = go.Figure()
    groups = [(k, k, c) for k, c in RESIDUAL_COLORS.items()] + [
        ("other", "not used (truncated, excluded)", "#7f8c8d")
    ]
    for status, label, color in groups:
        sel = [
            r
            for r in rows
            if (r["status"] == status) or (status == "other" and r["status"] not in RESIDUAL_COLORS)
        ]
        if not sel:
            continue
        fig.add_trace(
            go.Bar(
                x=[r["centroid_mm"] for r in sel],
                y=[r["organ"] for r in sel],
                orientation="h",
                name=label,
                marker_color=color,
                customdata=[[r["status"], r["surface_mm"]] for r in sel],
                hovertemplate="%{y}: %{x:.2f} mm (%{customdata[0]})<br>surface distance "
                "%{customdata[1]} mm<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": "Centroid residual per organ (mm)", "font": {"size": 13}},
        height=max(300, 18 * len(rows) + 110),
        margin={"l": 10, "r": 10, "t": 40, "b": 30},
        paper_bgcolor="#0e1117",
        plot_bgcolor="#0e1117",
        font={"color": "#e6e6e6"},
        barmode="overlay",
        yaxis={
            "tickfont": {"size": 10},
            "categoryorder": "array",
            "categoryarray": [r["organ"] for r in rows],
        },
        legend={"orientation": "h", "y": -0.06, "font": {"size": 10}},
    )
    return fig


def landing() -> None:
    st.markdown("## ctpassport")
    st.markdown(
        "<div class='ctp-sub'>Automatic CT segmentation (TotalSegmentator's 117 structures), anatomical "
        "passports and registration of follow-up scans, in your browser.</div>",
        unsafe_allow_html=True,
    )
    st.write("")
    try:
        core.choose_model()
    except CTPassportError as exc:
        st.warning(str(exc), icon=":material/warning:")
    cards = [
        (
            ":material/upload_file:",
            "1. Load a study",
            (
                f"Upload a NIfTI file (.nii, .nii.gz) or a zip of a DICOM series (up to {max_upload_bytes() // 2**20} MB), "
                "generate a demo phantom, or open a file from the server folder. Uploads stay in a temporary folder of "
                "this session and are deleted when it ends."
            ),
        ),
        (
            ":material/view_in_ar:",
            "2. Segment and inspect",
            (
                "One click (or automatically): progress, timings, model and backend. Axial, coronal and sagittal "
                "slices with CT windows and a label overlay that names each organ; the organ table with volumes (ml), "
                "mean HU and truncation; the passport's 3D organ map."
            ),
        ),
        (
            ":material/compare:",
            "3. Register and download",
            (
                "Register a follow-up to a baseline (rigid or deformable) from their passports: residuals per organ, "
                "the true error for phantoms, fused overlays. Download the label map, masks, passport, transforms and "
                "a report."
            ),
        ),
    ]
    for col, (icon, title, text) in zip(st.columns(3), cards):
        with col.container(border=True):
            st.markdown(f"**{icon} {title}**")
            st.caption(text)


def main() -> None:
    ss = state()
    alerts = st.container()
    settings = sidebar(ss, alerts)
    if ss.study is None:
        landing()
        return
    study_header(ss)
    if ss.seg is None:
        auto = settings.get("auto", True) and ss.pop("auto_segment", False)
        if auto or st.button("Segment", type="primary", key="segment_go", icon=":material/play_arrow:"):
            run_segmentation(ss, settings)
    if ss.seg is None:
        st.info("Not segmented yet: the viewer shows the CT alone.")
        viewer_panel(ss)
        return
    changed = core.settings_changed(ss.seg, settings, ss.study)
    if changed:  # the run on screen is not what the settings would make now: say so, offer to redo it
        st.info(
            "Settings changed since this segmentation (" + "; ".join(changed).replace("->", "→")
            + "): the results below are from the earlier settings.",
            icon=":material/sync_problem:",
        )
        if st.button("Segment again", key="segment_again", icon=":material/refresh:") \
                and run_segmentation(ss, settings):
            st.rerun()  # (a failed run keeps its error on the page)
    segmentation_summary(ss)
    tabs = st.tabs(
        [
            ":material/view_in_ar: Viewer and organs",
            ":material/badge: Passport",
            ":material/compare: Registration",
            ":material/download: Downloads",
        ],
        # keyed and tracked: the selected tab survives reruns even when the elements above the tabs differ
        # between runs (e.g. the segmentation progress box of the run that segmented), which otherwise re-creates
        # the tabs on the first one -- a click on Register would land the user back on the viewer
        key="main_tabs",
        on_change="rerun",
    )
    with tabs[0]:
        viewer_panel(ss)
        st.markdown("#### Organs")
        organ_table(ss)
    with tabs[1]:
        passport_tab(ss)
    with tabs[2]:
        registration_tab(ss, settings)
    with tabs[3]:
        downloads_tab(ss)


main()
