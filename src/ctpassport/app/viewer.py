"""The slice viewer: canonical views of a CT and its labels, CT windows, colour overlays, plotly figures.

Display conventions (radiological, as on a scanner console), from the closest-canonical RAS+ array
``C[i, j, k]`` (``i`` towards the patient's Right, ``j`` Anterior, ``k`` Superior):

* axial slice ``k``: rows run anterior (top) to posterior, columns from the patient's right (screen left)
  to left: ``D = C[::-1, ::-1, k].T``;
* coronal slice ``j``: rows superior (top) to inferior, columns right (screen left) to left:
  ``D = C[::-1, j, ::-1].T``;
* sagittal slice ``i``: rows superior to inferior, columns anterior (screen left) to posterior:
  ``D = C[i, ::-1, ::-1].T``.

Slice numbers shown to users run from 1; axial 1 is the most inferior slice, coronal 1 the most posterior,
sagittal 1 the patient's leftmost. Figure axes are millimetres in the slice plane, so pixels keep their true
aspect ratio whatever the voxel spacing.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model.classes import TOTAL_CLASSES

#: CT window presets: name -> (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "Soft tissue": (40.0, 400.0),
    "Lung": (-600.0, 1500.0),
    "Bone": (400.0, 1800.0),
}
PLANES = ("axial", "coronal", "sagittal")
#: Orientation letters at the (left, right, top, bottom) edges of each plane.
EDGE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
#: The largest hover grid (pixels per side) sent to the browser; bigger slices are subsampled for hovering.
HOVER_MAX = 160


def label_colors(n: int = 256) -> np.ndarray:
    """A fixed colour per label id (``(n, 3)`` uint8 RGB; id 0 black), the same as the passport pictures'
    (:func:`ctpassport.passport.show.organ_color`)."""
    from ..passport.show import organ_color

    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(1, n):
        out[k] = np.round(np.asarray(organ_color(k)) * 255)
    return out


COLORS = label_colors()


def label_name(k: int) -> str:
    """TotalSegmentator class name of id ``k`` (``label k`` for unknown ids)."""
    return TOTAL_CLASSES.get(int(k), f"label {int(k)}")


def hex_color(k: int) -> str:
    r, g, b = (int(c) for c in COLORS[int(k) % 256])
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass
class ViewVolume:
    """A CT (HU, its own dtype) and optional label map, reoriented to closest-canonical RAS+ for display.

    ``spacing``: mm per canonical axis (R, A, S). ``affine``: canonical voxel -> RAS+ mm.
    """

    ct: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.ct.shape)  # type: ignore[return-value]

    def n_slices(self, plane: str) -> int:
        """Number of slices of ``plane`` (axial: along S, coronal: along A, sagittal: along R)."""
        return self.shape[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]]

    def with_labels(self, labels: np.ndarray | None) -> ViewVolume:
        return ViewVolume(self.ct, labels, self.spacing, self.affine)


def canonical_view(data: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None) -> ViewVolume:
    """Reorient ``data`` (HU, storage order ``[i, j, k]``, ``affine`` voxel -> RAS+ mm) and ``labels`` (same
    grid) to closest-canonical RAS+ for display (axis permutations and flips only, no interpolation)."""
    from ..io.nifti import spacing_from_affine
    from ..io.orientation import reorientation

    ro = reorientation(affine, data.shape)
    ct = np.ascontiguousarray(ro.to_canonical(np.asarray(data)))  # keeps the dtype (int16 CTs stay small)
    lab = None
    if labels is not None:
        if labels.shape != data.shape:
            raise ValueError(f"labels have shape {labels.shape}, the CT {data.shape}")
        lab = np.ascontiguousarray(ro.to_canonical(np.asarray(labels)).astype(np.uint8, copy=False))
    caff = ro.canonical_affine
    sp = tuple(float(s) for s in spacing_from_affine(caff))
    return ViewVolume(ct=ct, labels=lab, spacing=sp, affine=caff)  # type: ignore[arg-type]


def canonical_labels(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A label map on the grid of ``affine`` (storage order) reoriented to closest-canonical RAS+ (uint8)."""
    from ..io.orientation import reorientation

    ro = reorientation(affine, labels.shape)
    return np.ascontiguousarray(ro.to_canonical(np.asarray(labels)).astype(np.uint8, copy=False))


def display_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D display array of canonical ``volume`` for ``plane`` at 0-based canonical ``index``."""
    if plane == "axial":
        return volume[::-1, ::-1, index].T
    if plane == "coronal":
        return volume[::-1, index, ::-1].T
    if plane == "sagittal":
        return volume[index, ::-1, ::-1].T
    raise ValueError(f"unknown plane {plane!r}")


def pixel_mm(view: ViewVolume, plane: str) -> tuple[float, float]:
    """(column, row) pixel size in mm of ``plane``'s display array."""
    sx, sy, sz = view.spacing
    return {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}[plane]


def slice_position_mm(view: ViewVolume, plane: str, index: int) -> float:
    """World coordinate (RAS+ mm) of the slice along its normal: x (sagittal), y (coronal) or z (axial)."""
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    centre = np.array([(s - 1) / 2.0 for s in view.shape], dtype=float)
    centre[axis] = index
    return float((view.affine @ np.append(centre, 1.0))[axis])


def window_gray(ct2d: np.ndarray, level: float, width: float) -> np.ndarray:
    """Grey values 0..255 (uint8) of HU values under the window ``level`` / ``width`` (HU)."""
    lo = level - width / 2.0
    g = (np.asarray(ct2d, dtype=np.float32) - lo) * (255.0 / max(width, 1e-6))
    return np.clip(g, 0, 255).astype(np.uint8)


def overlay_rgb(
    gray: np.ndarray, labels2d: np.ndarray | None, opacity: float, colors: np.ndarray = COLORS
) -> np.ndarray:
    """RGB (uint8) of a grey slice with labels blended in at ``opacity`` (0..1); background stays grey."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if labels2d is not None and opacity > 0:
        m = labels2d > 0
        if m.any():
            col = colors[labels2d[m]].astype(np.float32)
            rgb[m] = (1.0 - opacity) * rgb[m] + opacity * col
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def fusion_rgb(fixed_gray: np.ndarray, moving_gray: np.ndarray) -> np.ndarray:
    """Magenta/green fusion of two grey slices (uint8 RGB): aligned structures look grey, the fixed image
    alone magenta, the moving (warped) image alone green."""
    f = fixed_gray.astype(np.uint8)
    m = moving_gray.astype(np.uint8)
    return np.stack([f, m, f], axis=2)


def png_data_uri(rgb: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of an RGB uint8 image (compact in the browser and in tests)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buf, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def present_labels(labels2d: np.ndarray | None) -> list[int]:
    """Label ids (> 0) present in a slice, ascending."""
    if labels2d is None:
        return []
    ids = np.unique(labels2d)
    return [int(k) for k in ids if k > 0]


def slice_figure(
    rgb: np.ndarray,
    plane: str,
    pixel: tuple[float, float],
    *,
    title: str,
    labels2d: np.ndarray | None = None,
    ct2d: np.ndarray | None = None,
    cross: tuple[float, float] | None = None,
    height: int = 420,
) -> Any:
    """A plotly figure of one display slice.

    ``rgb``: the display image (H, W, 3 uint8); ``pixel``: (column, row) size in mm, so the axes are mm in the
    slice plane; ``labels2d`` / ``ct2d`` (same H, W): hovering names the organ and gives the HU value;
    ``cross``: (column, row) position in mm of crosshair lines (the other planes' slices).
    """
    import plotly.graph_objects as go

    h, w = rgb.shape[:2]
    dx, dy = pixel
    fig = go.Figure()
    fig.add_trace(
        go.Image(
            source=png_data_uri(rgb), x0=dx / 2.0, dx=dx, y0=dy / 2.0, dy=dy, hoverinfo="skip", name="slice"
        )
    )
    if labels2d is not None or ct2d is not None:
        fy = max(1, int(np.ceil(h / HOVER_MAX)))
        fx = max(1, int(np.ceil(w / HOVER_MAX)))
        rows = np.arange(fy // 2, h, fy)
        cols = np.arange(fx // 2, w, fx)
        lab = labels2d[np.ix_(rows, cols)] if labels2d is not None else np.zeros((rows.size, cols.size), int)
        names = np.array([""] + [label_name(k) for k in range(1, 256)], dtype=object)[lab]
        hu = (
            ct2d[np.ix_(rows, cols)].astype(np.float32)
            if ct2d is not None
            else np.zeros(lab.shape, np.float32)
        )
        fig.add_trace(
            go.Heatmap(
                z=lab.astype(np.int16),
                x=(cols + 0.5) * dx,
                y=(rows + 0.5) * dy,
                text=names,
                customdata=np.round(hu).astype(np.int32),
                showscale=False,
                name="labels",
                colorscale=[[0.0, "rgba(0,0,0,0)"], [1.0, "rgba(0,0,0,0)"]],
                hovertemplate="%{text}<br>%{customdata} HU<extra></extra>",
            )
        )
    if cross is not None:
        line = {"color": "rgba(255, 215, 0, 0.55)", "width": 1, "dash": "dot"}
        fig.add_shape(type="line", x0=cross[0], x1=cross[0], y0=0, y1=h * dy, line=line)
        fig.add_shape(type="line", x0=0, x1=w * dx, y0=cross[1], y1=cross[1], line=line)
    left, right, top, bottom = EDGE_LETTERS[plane]
    font = {"color": "#f5d76e", "size": 14}
    for text, x, y, xa, ya in (
        (left, 0, h * dy / 2, "left", "middle"),
        (right, w * dx, h * dy / 2, "right", "middle"),
        (top, w * dx / 2, 0, "center", "top"),
        (bottom, w * dx / 2, h * dy, "center", "bottom"),
    ):
        fig.add_annotation(
            x=x, y=y, text=f"<b>{text}</b>", showarrow=False, xanchor=xa, yanchor=ya, font=font
        )
    fig.update_xaxes(visible=False, range=[0, w * dx], constrain="domain")
    fig.update_yaxes(visible=False, range=[h * dy, 0], scaleanchor="x", scaleratio=1, constrain="domain")
    fig.update_layout(
        title={"text": title, "font": {"size": 13}, "x": 0.02, "y": 0.98},
        margin={"l": 4, "r": 4, "t": 30, "b": 4},
        height=height,
        dragmode="pan",
        paper_bgcolor="#0e1117",
        plot_bgcolor="#000000",
        font={"color": "#e6e6e6"},
        hoverlabel={"bgcolor": "#1f2430", "font": {"color": "#ffffff"}},
    )
    return fig


def plane_figure(
    view: ViewVolume,
    plane: str,
    index: int,
    *,
    window: tuple[float, float],
    opacity: float,
    cursor: tuple[int, int, int] | None = None,
    fusion: ViewVolume | None = None,
    height: int = 420,
) -> tuple[Any, list[int]]:
    """Figure of ``plane`` at 0-based canonical ``index``, and the label ids it shows.

    ``window``: (level, width) HU; ``opacity``: label overlay 0..1; ``cursor``: canonical (i, j, k) of the
    three sliders (crosshair); ``fusion``: a second volume on the same canonical grid (e.g. the warped
    follow-up) shown as a magenta/green fusion with ``view`` instead of plain grey.
    """
    ct2d = display_slice(view.ct, plane, index)
    lab2d = display_slice(view.labels, plane, index) if view.labels is not None else None
    gray = window_gray(ct2d, *window)
    if fusion is not None:
        gray2 = window_gray(display_slice(fusion.ct, plane, index), *window)
        rgb = fusion_rgb(gray, gray2)
        if lab2d is not None and opacity > 0:
            rgb = _blend_labels(rgb, lab2d, opacity)
    else:
        rgb = overlay_rgb(gray, lab2d, opacity)
    n = view.n_slices(plane)
    pos = slice_position_mm(view, plane, index)
    axis_name = {"axial": "z", "coronal": "y", "sagittal": "x"}[plane]
    title = f"{plane.capitalize()} {index + 1}/{n} ({axis_name} = {pos:.1f} mm)"
    cross = None
    if cursor is not None:
        cross = _cross_mm(view, plane, cursor)
    fig = slice_figure(
        rgb, plane, pixel_mm(view, plane), title=title, labels2d=lab2d, ct2d=ct2d, cross=cross, height=height
    )
    return fig, present_labels(lab2d)


def _blend_labels(rgb: np.ndarray, lab2d: np.ndarray, opacity: float) -> np.ndarray:
    out = rgb.astype(np.float32)
    m = lab2d > 0
    out[m] = (1.0 - opacity) * out[m] + opacity * COLORS[lab2d[m]].astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _cross_mm(view: ViewVolume, plane: str, cursor: tuple[int, int, int]) -> tuple[float, float]:
    """Crosshair (column, row) position in mm for the canonical cursor (i, j, k) on ``plane``."""
    i, j, k = cursor
    nx, ny, nz = view.shape
    dx, dy = pixel_mm(view, plane)
    if plane == "axial":  # columns: reversed i, rows: reversed j
        return ((nx - 1 - i) + 0.5) * dx, ((ny - 1 - j) + 0.5) * dy
    if plane == "coronal":  # columns: reversed i, rows: reversed k
        return ((nx - 1 - i) + 0.5) * dx, ((nz - 1 - k) + 0.5) * dy
    return ((ny - 1 - j) + 0.5) * dx, ((nz - 1 - k) + 0.5) * dy  # sagittal: reversed j, reversed k


def best_slices(view: ViewVolume) -> tuple[int, int, int]:
    """A good first canonical cursor (i, j, k): the centre of the labelled region, else the volume centre.
    Computed once per view (cached on it)."""
    cached = getattr(view, "_best", None)
    if cached is not None:
        return cached
    out: tuple[int, int, int] = tuple(s // 2 for s in view.shape)  # type: ignore[assignment]
    if view.labels is not None:
        idx = [np.flatnonzero(view.labels.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if all(v.size for v in idx):
            out = tuple(int((v[0] + v[-1]) // 2) for v in idx)  # type: ignore[assignment]
    view._best = out  # type: ignore[attr-defined]
    return out


def legend_html(ids: list[int], limit: int = 256) -> str:
    """Coloured chips naming the organs ``ids`` (HTML, escaped names), for a legend under the viewer."""
    import html

    chips = []
    for k in ids[:limit]:
        chips.append(
            f'<span style="display:inline-block;margin:2px 6px 2px 0;padding:1px 7px;border-radius:9px;'
            f'background:{hex_color(k)};color:#111;font-size:0.78rem;font-weight:600">'
            f"{html.escape(label_name(k))}</span>"
        )
    more = f" <span style='font-size:0.78rem'>+{len(ids) - limit} more</span>" if len(ids) > limit else ""
    return "".join(chips) + more
