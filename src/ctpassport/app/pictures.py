"""Passport pictures for the app and its report, from :mod:`ctpassport.passport.show`.

The figures are :func:`ctpassport.passport.show.html_figures` (3-D organ map, volume chart, spine), restyled
for the app's dark page; the report embeds :func:`ctpassport.passport.show.render_png`. Coordinates are
world mm, RAS+ (as in the passport).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

_DARK = {"paper_bgcolor": "#0e1117", "plot_bgcolor": "#0e1117", "font": {"color": "#e6e6e6"}}


def passport_figures(passport: Any) -> dict[str, Any]:
    """``{"map": 3-D organ map, "volumes": volume bar chart, "spine": spine chain}`` (plotly figures)."""
    from ..passport.show import html_figures

    fig3d, figvol, figsp = html_figures(passport)
    fig3d.update_layout(
        height=640,
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        title={"font": {"size": 13}},
        legend={"itemsizing": "constant", "font": {"size": 10}},
        **_DARK,
    )
    figvol.update_layout(margin={"l": 10, "r": 10, "t": 40, "b": 10}, title={"font": {"size": 13}}, **_DARK)
    figsp.update_layout(
        height=560, margin={"l": 10, "r": 10, "t": 60, "b": 10}, title={"font": {"size": 13}}, **_DARK
    )
    return {"map": fig3d, "volumes": figvol, "spine": figsp}


def organ_map(passport: Any) -> Any:
    """The rotatable 3-D organ map (plotly)."""
    return passport_figures(passport)["map"]


def volume_chart(passport: Any) -> Any:
    """Organ volumes (ml), sorted, as a plotly bar chart."""
    return passport_figures(passport)["volumes"]


def passport_png_uri(passport: Any, dpi: int = 40) -> str:
    """The passport picture (:func:`ctpassport.passport.show.render_png`) as a PNG data URI."""
    from ..passport.show import render_png

    with tempfile.TemporaryDirectory(prefix="ctpassport-report-") as tmp:
        path = render_png(passport, Path(tmp) / "passport.png", dpi=dpi)
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def report_figures_html(passport: Any) -> str:
    """HTML for the report: the passport picture (3-D map, volumes, projections, spine) as one image."""
    uri = passport_png_uri(passport)
    return (
        f"<p><img src='{uri}' alt='passport: 3-D organ map, volumes, projections and spine' "
        f"style='max-width:100%'></p>"
    )
