"""Pictures of a passport: what the original study's visualiser drew, as a PNG (matplotlib) and HTML (plotly).

The PNG (:func:`render_png`, ``FIGSIZE_IN`` x ``dpi`` pixels, 2400 x 3200 by default) holds

* a 3-D organ map: boundary point clouds, centroids and the principal axes (``centroid +- sqrt(eigenvalue)
  * eigenvector``, i.e. +-1 standard deviation), one colour per organ; the body outline's skin points (when
  the passport has one, ``--body``) faint grey behind them, here and in the projections;
* the organ volumes (ml) as a sorted horizontal bar chart with every organ's name;
* the three anatomical projections of the boundary points (axial seen from the feet, coronal seen from the
  front, sagittal seen from the patient's left) in radiological convention (patient's right on the viewer's
  left), organs named at their centroids (the largest organs first; names that would overlap are skipped);
* a spine view: the vertebrae present (C1..S1) as a labelled chain of centroids in coronal and sagittal
  projection; a missing level between two present ones is drawn as a dashed red gap with its name.

All coordinates are world mm, RAS+ (as in the passport). matplotlib and plotly are imported inside the
functions (``import ctpassport`` stays cheap).
"""

from __future__ import annotations

import colorsys
import html
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_path
from .schema import Organ, Passport

#: Colour of the body outline's skin points (drawn faint, behind the organs).
SKIN_COLOR = (0.55, 0.55, 0.55)
#: Figure size of the PNG (inches); at ``dpi`` 100 the image is 2400 x 3200 pixels.
FIGSIZE_IN = (24.0, 32.0)

#: The vertebrae of the spine view, top to bottom (TotalSegmentator class names).
VERTEBRAE: tuple[str, ...] = (
    *(f"vertebrae_C{i}" for i in range(1, 8)),
    *(f"vertebrae_T{i}" for i in range(1, 13)),
    *(f"vertebrae_L{i}" for i in range(1, 6)),
    "vertebrae_S1",
)

# view: (horizontal world axis, vertical world axis, title, horizontal end labels, vertical end labels)
_VIEWS = {
    "axial": (0, 1, "Axial (from the feet)", ("R", "L"), ("P", "A")),
    "coronal": (0, 2, "Coronal (from the front)", ("R", "L"), ("I", "S")),
    "sagittal": (1, 2, "Sagittal (from the left)", ("A", "P"), ("I", "S")),
}


def require_drawing(*, png: bool = True, html: bool = False) -> None:
    """Raise :class:`~ctpassport.errors.CTPassportError` (one line, with the pip command) unless the optional
    libraries are installed: matplotlib for the PNG (:func:`render_png`), plotly for the page
    (:func:`render_html`). Both come with ``pip install 'ctpassport[viz]'``; a plain install has neither."""
    from ..errors import CTPassportError

    for wanted, module, what in ((png, "matplotlib", "the PNG picture"), (html, "plotly", "the HTML page")):
        if not wanted:
            continue
        try:
            __import__(module)
        except ImportError:
            raise CTPassportError(f"drawing {what} of a passport needs {module}, which is not installed",
                                  hint="pip install 'ctpassport[viz]'") from None


def png_size_px(dpi: int = 100) -> tuple[int, int]:
    """(width, height) in pixels of the PNG :func:`render_png` writes at ``dpi``."""
    return round(FIGSIZE_IN[0] * dpi), round(FIGSIZE_IN[1] * dpi)


def organ_label(o: Organ) -> str:
    """The organ's TotalSegmentator name, or ``label_<id>`` for ids it does not know."""
    return o.name if o.name else f"label_{o.id}"


def short_vertebra(name: str) -> str:
    return name.replace("vertebrae_", "")


def organ_color(label_id: int) -> tuple[float, float, float]:
    """A fixed, well-separated RGB colour (components 0..1) per label id (golden-ratio hues, alternating
    brightness)."""
    h = (label_id * 0.618033988749895) % 1.0
    s = 0.75 if label_id % 2 else 0.55
    v = 0.85 if (label_id // 2) % 2 else 0.65
    return colorsys.hsv_to_rgb(h, s, v)


def _hex(c: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * x):02x}" for x in c)


def spine_chain(passport: Passport) -> list[dict[str, Any]]:
    """The vertebrae C1..S1 in order, each ``{"name", "short", "present", "centroid"}`` (world mm, RAS+).

    Missing levels between the highest and the lowest present vertebra are listed with ``present=False``
    and ``centroid`` interpolated linearly between their present neighbours (for drawing the gap);
    levels outside that range are left out.
    """
    by_name = {o.name: o for o in passport.organs if o.name}
    idx = [i for i, n in enumerate(VERTEBRAE) if n in by_name]
    if not idx:
        return []
    chain: list[dict[str, Any]] = []
    for i in range(idx[0], idx[-1] + 1):
        name = VERTEBRAE[i]
        if name in by_name:
            c = np.asarray(by_name[name].centroid_mm, dtype=np.float64)
            chain.append({"name": name, "short": short_vertebra(name), "present": True, "centroid": c})
        else:
            above = max(j for j in idx if j < i)
            below = min(j for j in idx if j > i)
            ca = np.asarray(by_name[VERTEBRAE[above]].centroid_mm, dtype=np.float64)
            cb = np.asarray(by_name[VERTEBRAE[below]].centroid_mm, dtype=np.float64)
            t = (i - above) / (below - above)
            chain.append({"name": name, "short": short_vertebra(name), "present": False,
                          "centroid": (1 - t) * ca + t * cb})
    return chain


# ------------------------------------------------------------------------------------------------
# matplotlib
# ------------------------------------------------------------------------------------------------
def _label_positions(organs: list[Organ], h: int, v: int, pt_per_mm: float, fontsize: float) -> list[Organ]:
    """Organs to name in a projection: largest first, skipping a name whose text box would overlap one
    already placed (boxes estimated in points from the name length, ``pt_per_mm`` being the plot scale)."""
    boxes: list[tuple[float, float, float, float]] = []
    chosen: list[Organ] = []
    for o in sorted(organs, key=lambda o: -o.volume_mm3):
        x, y = o.centroid_mm[h] * pt_per_mm, o.centroid_mm[v] * pt_per_mm
        w, hh = 0.62 * fontsize * len(organ_label(o)) / 2 + 2, 0.75 * fontsize
        box = (x - w, x + w, y - hh, y + hh)
        if all(box[1] < b[0] or box[0] > b[1] or box[3] < b[2] or box[2] > b[3] for b in boxes):
            chosen.append(o)
            boxes.append(box)
    return chosen


def _draw_projection(ax: Any, passport: Passport, view: str) -> None:
    import matplotlib.patheffects as pe

    h, v, title, hends, vends = _VIEWS[view]
    organs = passport.organs
    if passport.body is not None:  # the skin, faint, behind the organs
        skin = passport.body.points_array()
        ax.scatter(skin[:, h], skin[:, v], s=1.5, color=SKIN_COLOR, alpha=0.35, linewidths=0, rasterized=True)
    allp = [o.points_array() for o in organs]
    for o, pts in zip(organs, allp):
        if len(pts):
            ax.scatter(pts[:, h], pts[:, v], s=2.5, color=organ_color(o.id), alpha=0.6, linewidths=0,
                       rasterized=True)
    if organs:
        cat = np.concatenate([p for p in allp if len(p)] + [np.array([o.centroid_mm for o in organs])])
        bbox = ax.get_position()  # figure fraction -> the axes' size in points
        w_pt, h_pt = bbox.width * FIGSIZE_IN[0] * 72.0, bbox.height * FIGSIZE_IN[1] * 72.0
        rng_h, rng_v = float(np.ptp(cat[:, h])) * 1.1 + 1.0, float(np.ptp(cat[:, v])) * 1.1 + 1.0
        pt_per_mm = min(w_pt / rng_h, h_pt / rng_v)  # equal aspect: the tighter direction sets the scale
        fs = 7.0
        for o in _label_positions(organs, h, v, pt_per_mm, fs):
            ax.annotate(organ_label(o), (o.centroid_mm[h], o.centroid_mm[v]), fontsize=fs, ha="center",
                        va="center", color="black",
                        path_effects=[pe.withStroke(linewidth=2.2, foreground="white")])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=14)
    ax.set_xlabel(f"{'xyz'[h]} (mm, RAS)   {hends[0]} \u2190 \u2192 {hends[1]}", fontsize=10)
    ax.set_ylabel(f"{'xyz'[v]} (mm, RAS)   {vends[0]} \u2190 \u2192 {vends[1]}", fontsize=10)
    # Radiological convention: the patient's right (+x) on the viewer's left; anterior on the left (sagittal).
    if h in (0, 1):
        ax.invert_xaxis()
    ax.grid(True, linewidth=0.3, alpha=0.5)


def _draw_3d(ax: Any, passport: Passport) -> None:
    allp = []
    if passport.body is not None:  # the skin, faint, behind the organs
        skin = passport.body.points_array()
        if len(skin):
            ax.scatter(skin[:, 0], skin[:, 1], skin[:, 2], s=1.0, color=SKIN_COLOR, alpha=0.25, linewidths=0,
                       depthshade=False, rasterized=True)
            allp.append(skin)
    for o in passport.organs:
        col = organ_color(o.id)
        pts = o.points_array()
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=2.0, color=col, alpha=0.5, linewidths=0,
                       depthshade=False, rasterized=True)
            allp.append(pts)
        c = np.asarray(o.centroid_mm)
        ax.scatter([c[0]], [c[1]], [c[2]], s=18, color=col, edgecolors="black", linewidths=0.4,
                   depthshade=False)
        for lam, vec in zip(o.eigenvalues_mm2, o.eigenvectors):
            d = np.sqrt(max(lam, 0.0)) * np.asarray(vec)
            seg = np.stack([c - d, c + d])
            ax.plot(seg[:, 0], seg[:, 1], seg[:, 2], color=col, linewidth=1.3)
        allp.append(c[None])
    if allp:
        cat = np.concatenate(allp)
        lo, hi = cat.min(axis=0), cat.max(axis=0)
        span = np.maximum(hi - lo, 1.0)
        ax.set_xlim(hi[0] + 0.02 * span[0], lo[0] - 0.02 * span[0])  # patient's right on the left
        ax.set_ylim(lo[1] - 0.02 * span[1], hi[1] + 0.02 * span[1])
        ax.set_zlim(lo[2] - 0.02 * span[2], hi[2] + 0.02 * span[2])
        ax.set_box_aspect(tuple(float(s) for s in span))
    ax.view_init(elev=12, azim=-60)
    ax.set_xlabel("x (mm)  R \u2192 L", fontsize=11)
    ax.set_ylabel("y (mm)  P \u2192 A", fontsize=11)
    ax.set_zlabel("z (mm)  I \u2192 S", fontsize=11)
    ax.set_title("Organ map: boundary points, centroids, principal axes (\u00b11 sd)", fontsize=15)


def _draw_volumes(ax: Any, passport: Passport) -> None:
    organs = sorted(passport.organs, key=lambda o: o.volume_mm3)
    if not organs:
        ax.text(0.5, 0.5, "no organs", ha="center", va="center", fontsize=14, transform=ax.transAxes)
        ax.set_axis_off()
        return
    vols = [o.volume_mm3 / 1000.0 for o in organs]
    y = np.arange(len(organs))
    ax.barh(y, vols, color=[organ_color(o.id) for o in organs], edgecolor="black", linewidth=0.3)
    fs = float(np.clip(560.0 / max(len(organs), 1), 6.0, 11.0))
    ax.set_yticks(y, [organ_label(o) + (" *" if o.truncated else "") for o in organs], fontsize=fs)
    ax.set_ylim(-0.7, len(organs) - 0.3)
    ax.set_xscale("log")
    ax.set_xlabel("volume (ml, log scale); * = touches the image border", fontsize=11)
    ax.set_title(f"Organ volumes ({len(organs)} organs)", fontsize=15)
    ax.grid(True, axis="x", linewidth=0.3, alpha=0.5)


def _draw_spine(ax_cor: Any, ax_sag: Any, passport: Passport) -> None:
    import matplotlib.patheffects as pe

    chain = spine_chain(passport)
    for ax, (h, name) in ((ax_cor, (0, "coronal")), (ax_sag, (1, "sagittal"))):
        ax.set_title(f"Spine ({name})", fontsize=14)
        if not chain:
            ax.text(0.5, 0.5, "no vertebrae (C1..S1) in this passport", ha="center", va="center",
                    fontsize=12, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for a, b in itertools.pairwise(chain):
            ca, cb = a["centroid"], b["centroid"]
            gap = not (a["present"] and b["present"])
            ax.plot([ca[h], cb[h]], [ca[2], cb[2]], color="tab:red" if gap else "0.3",
                    linestyle="--" if gap else "-", linewidth=1.6 if gap else 1.2)
        for item in chain:
            c = item["centroid"]
            if item["present"]:
                ax.scatter([c[h]], [c[2]], s=36, color=organ_color(_id_of(passport, item["name"])),
                           edgecolors="black", linewidths=0.5, zorder=3)
                ax.annotate(item["short"], (c[h], c[2]), xytext=(7, 0), textcoords="offset points", fontsize=9,
                            va="center", path_effects=[pe.withStroke(linewidth=2, foreground="white")])
            else:
                ax.scatter([c[h]], [c[2]], s=40, marker="x", color="tab:red", zorder=3)
                ax.annotate(f"{item['short']} missing", (c[h], c[2]), xytext=(7, 0), textcoords="offset points",
                            fontsize=9, va="center", color="tab:red",
                            path_effects=[pe.withStroke(linewidth=2, foreground="white")])
        zs = [it["centroid"][2] for it in chain]
        hs = [it["centroid"][h] for it in chain]
        pad = max(20.0, 0.08 * (max(zs) - min(zs)))
        ax.set_ylim(min(zs) - pad, max(zs) + pad)
        half = max(60.0, 0.5 * (max(hs) - min(hs)) + 30.0)
        mid = 0.5 * (max(hs) + min(hs))
        ax.set_xlim(mid + half, mid - half)  # radiological: right (or anterior) on the left
        ax.set_xlabel("x (mm)  R \u2190 \u2192 L" if h == 0 else "y (mm)  A \u2190 \u2192 P", fontsize=10)
        ax.set_ylabel("z (mm)  I \u2192 S", fontsize=10)
        ax.grid(True, linewidth=0.3, alpha=0.5)


def _id_of(passport: Passport, name: str) -> int:
    o = passport.organ(name)
    return o.id if o is not None else 0


def _title(passport: Passport) -> str:
    g = passport.grid
    src = Path(passport.source.path).name if passport.source.path else "(array)"
    return (f"Passport of {src}: {len(passport.organs)} organs, grid {g.kind} {g.shape[0]}x{g.shape[1]}x"
            f"{g.shape[2]} @ {g.spacing_mm[0]:.2f}x{g.spacing_mm[1]:.2f}x{g.spacing_mm[2]:.2f} mm "
            f"({''.join(g.orientation)}), model {passport.model_id or '-'}, created {passport.created}")


def render_png(passport: Passport, path: str | Path, *, dpi: int = 100) -> Path:
    """Draw the passport (see the module docstring) into a PNG of :func:`png_size_px` pixels; atomic write."""
    require_drawing(png=True)
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec

    fig = Figure(figsize=FIGSIZE_IN, dpi=dpi)
    gs = GridSpec(4, 3, figure=fig, left=0.05, right=0.98, top=0.95, bottom=0.035, wspace=0.45, hspace=0.22,
                  width_ratios=[1.0, 1.0, 0.9])
    ax3d = fig.add_subplot(gs[0:2, 0:2], projection="3d")
    _draw_3d(ax3d, passport)
    _draw_volumes(fig.add_subplot(gs[0:4, 2]), passport)
    _draw_projection(fig.add_subplot(gs[2, 0]), passport, "axial")
    _draw_projection(fig.add_subplot(gs[2, 1]), passport, "coronal")
    _draw_projection(fig.add_subplot(gs[3, 0]), passport, "sagittal")
    sub = gs[3, 1].subgridspec(1, 2, wspace=0.35)
    _draw_spine(fig.add_subplot(sub[0, 0]), fig.add_subplot(sub[0, 1]), passport)
    fig.suptitle(_title(passport), fontsize=15, y=0.985)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out


# ------------------------------------------------------------------------------------------------
# plotly
# ------------------------------------------------------------------------------------------------
def _hover(o: Organ) -> str:
    c = o.centroid_mm
    hu = f"<br>HU {o.hu_mean:.0f} \u00b1 {o.hu_std:.0f}" if o.hu_mean is not None and o.hu_std is not None else ""
    return (f"<b>{html.escape(organ_label(o))}</b> (id {o.id})<br>{o.volume_mm3 / 1000.0:.1f} ml, "
            f"{o.voxel_count} voxels<br>centroid ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm RAS"
            f"{'<br>touches the image border' if o.truncated else ''}{hu}")


def html_figures(passport: Passport) -> list[Any]:
    """The plotly figures of the interactive page: 3-D organ map, sorted volumes, spine chain."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig3d = go.Figure()
    if passport.body is not None:
        skin = passport.body.points_array()
        fig3d.add_trace(go.Scatter3d(x=skin[:, 0], y=skin[:, 1], z=skin[:, 2], mode="markers",
                                     name="body outline (skin)",
                                     marker={"size": 1.2, "color": _hex(SKIN_COLOR), "opacity": 0.25},
                                     hovertext=_hover(passport.body), hoverinfo="text"))
    for o in passport.organs:
        col = _hex(organ_color(o.id))
        name = organ_label(o)
        pts = o.points_array()
        c = np.asarray(o.centroid_mm)
        fig3d.add_trace(go.Scatter3d(x=pts[:, 0], y=pts[:, 1], z=pts[:, 2], mode="markers", name=name,
                                     legendgroup=name, marker={"size": 1.6, "color": col, "opacity": 0.5},
                                     hovertext=_hover(o), hoverinfo="text"))
        lx: list[float | None] = []
        ly: list[float | None] = []
        lz: list[float | None] = []
        for lam, vec in zip(o.eigenvalues_mm2, o.eigenvectors):  # three segments, broken by None
            d = np.sqrt(max(lam, 0.0)) * np.asarray(vec)
            p0, p1 = (c - d).tolist(), (c + d).tolist()
            lx += [p0[0], p1[0], None]
            ly += [p0[1], p1[1], None]
            lz += [p0[2], p1[2], None]
        fig3d.add_trace(go.Scatter3d(x=lx, y=ly, z=lz, mode="lines", line={"color": col, "width": 4},
                                     legendgroup=name, showlegend=False, hoverinfo="skip"))
        fig3d.add_trace(go.Scatter3d(x=[c[0]], y=[c[1]], z=[c[2]], mode="markers+text", text=[name],
                                     textfont={"size": 9}, legendgroup=name, showlegend=False,
                                     marker={"size": 4, "color": col, "line": {"color": "black", "width": 1}},
                                     hovertext=_hover(o), hoverinfo="text"))
    fig3d.update_layout(title="Organ map: boundary points, centroids, principal axes (\u00b11 sd), world mm RAS",
                        height=900, scene={"aspectmode": "data", "xaxis": {"title": "x (mm) R\u2192L",
                                                                           "autorange": "reversed"},
                                           "yaxis": {"title": "y (mm) P\u2192A"},
                                           "zaxis": {"title": "z (mm) I\u2192S"}},
                        legend={"itemsizing": "constant"})

    organs = sorted(passport.organs, key=lambda o: o.volume_mm3)
    figvol = go.Figure(go.Bar(x=[o.volume_mm3 / 1000.0 for o in organs], y=[organ_label(o) for o in organs],
                              orientation="h", marker_color=[_hex(organ_color(o.id)) for o in organs],
                              hovertext=[_hover(o) for o in organs], hoverinfo="text"))
    figvol.update_layout(title="Organ volumes (ml)", xaxis_type="log", height=max(400, 16 * len(organs) + 120),
                         yaxis={"tickfont": {"size": 10}})

    chain = spine_chain(passport)
    figsp = make_subplots(rows=1, cols=2, subplot_titles=("Spine (coronal)", "Spine (sagittal)"))
    for col_i, h in ((1, 0), (2, 1)):
        for a, b in itertools.pairwise(chain):
            gap = not (a["present"] and b["present"])
            figsp.add_trace(go.Scatter(x=[a["centroid"][h], b["centroid"][h]], y=[a["centroid"][2], b["centroid"][2]],
                                       mode="lines", showlegend=False, hoverinfo="skip",
                                       line={"color": "red" if gap else "gray", "dash": "dash" if gap else "solid"}),
                            row=1, col=col_i)
        for present in (True, False):
            items = [it for it in chain if it["present"] is present]
            if not items:
                continue
            figsp.add_trace(go.Scatter(
                x=[it["centroid"][h] for it in items], y=[it["centroid"][2] for it in items],
                mode="markers+text", text=[it["short"] + ("" if present else " missing") for it in items],
                textposition="middle right", showlegend=False,
                marker={"symbol": "circle" if present else "x", "size": 9, "color": "steelblue" if present else "red"}),
                row=1, col=col_i)
        figsp.update_xaxes(autorange="reversed", title_text="x (mm) R\u2190\u2192L" if h == 0 else "y (mm) A\u2190\u2192P",
                           row=1, col=col_i)
        figsp.update_yaxes(title_text="z (mm) I\u2192S", scaleanchor=f"x{col_i if col_i > 1 else ''}", row=1, col=col_i)
    figsp.update_layout(height=800, title="Spine: vertebrae C1..S1 present (gaps dashed red)")
    return [fig3d, figvol, figsp]


def render_html(passport: Passport, path: str | Path) -> Path:
    """Write an interactive, self-contained HTML page (plotly.js embedded: works offline); atomic write."""
    require_drawing(png=False, html=True)
    figs = html_figures(passport)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    names = ", ".join(html.escape(organ_label(o)) for o in passport.organs) or "none"
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ctpassport: "
        f"{html.escape(Path(passport.source.path).name if passport.source.path else 'passport')}</title></head>"
        f"<body style=\"font-family: sans-serif\"><h2>{html.escape(_title(passport))}</h2>"
        f"<p><b>Organs:</b> {names}</p>"
        + "".join(parts) + "</body></html>\n"
    )
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
