"""The ctpassport web app (Streamlit): segment, inspect, register and download, in the browser.

``ctpassport app`` runs ``streamlit run`` on :data:`APP_SCRIPT` in a subprocess (see :func:`streamlit_command`).
Streamlit and plotly are imported only by the app script and the functions that draw, so importing this
package stays cheap.

Settings reach the app script through environment variables (set by ``ctpassport app``):

===============================  ===============================================================
``CTPASSPORT_APP_ROOT``          the server folder whose CTs users may open (none: no server files)
``CTPASSPORT_APP_MODEL``         a model folder (else installed TotalSegmentator weights, else the demo)
``CTPASSPORT_DB``                the passport store (see :mod:`ctpassport.store`)
===============================  ===============================================================
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The Streamlit script ``ctpassport app`` runs.
APP_SCRIPT = Path(__file__).resolve().with_name("streamlit_app.py")


def streamlit_command(
    *, host: str = "127.0.0.1", port: int = 8501, max_upload_mb: int = 4096, python: str | None = None
) -> list[str]:
    """The ``streamlit run`` command line of the app: bound to ``host``:``port``, uploads up to
    ``max_upload_mb`` MB, headless (no browser opened), no usage statistics, no file watcher."""
    return [
        python or sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        "--server.address",
        host,
        "--server.port",
        str(int(port)),
        "--server.maxUploadSize",
        str(int(max_upload_mb)),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--browser.gatherUsageStats",
        "false",
        "--runner.magicEnabled",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--client.showErrorDetails",
        "none",
        "--theme.base",
        "dark",
        "--theme.primaryColor",
        "#4fb3bf",
    ]
