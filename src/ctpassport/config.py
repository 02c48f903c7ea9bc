"""One typed configuration object, with environment overrides that fail with a helpful message.

Environment variables (all optional):

================================  ==========================================================
``CTPASSPORT_CACHE_DIR``          where exported ONNX models are cached (default
                                  ``$XDG_CACHE_HOME/ctpassport`` or ``~/.cache/ctpassport``)
``CTPASSPORT_THREADS``            intra-op threads for inference (0 = all cores, default 0)
``CTPASSPORT_BACKEND``            default inference backend (``auto``, ``onnxruntime``, ``openvino``...)
``CTPASSPORT_SHARED``             the shared data folder (``<repo>/../shared`` by default);
                                  tests read the real CTs from ``$CTPASSPORT_SHARED/data/ct``
``CTPASSPORT_APP_ROOT``           server folder the web app may browse (default: none)
================================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

_ENV_PREFIX = "CTPASSPORT_"
BACKENDS = ("auto", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8", "cuda", "torch")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "ctpassport"


def _default_shared_dir() -> Path:
    # src/ctpassport/config.py -> repository root is parents[2]; ../shared lies beside the checkout.
    return (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


class Config(BaseModel):
    """Settings of one ctpassport run. Build it with :meth:`from_env`; fields are immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    threads: int = Field(default=0, ge=0, le=1024)
    backend: str = "auto"
    shared_dir: Path = Field(default_factory=_default_shared_dir)
    app_root: Path | None = None

    @property
    def ct_data_dir(self) -> Path:
        """The folder of real example CTs (``<shared>/data/ct``)."""
        return self.shared_dir / "data" / "ct"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Config:
        """Read ``CTPASSPORT_*`` variables from ``environ`` (default ``os.environ``).

        Raises :class:`~ctpassport.errors.ConfigError` naming the variable, the bad value and a fix.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            key = _ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        backend = values.get("backend")
        if backend is not None and str(backend) not in BACKENDS:
            raise ConfigError(
                f"CTPASSPORT_BACKEND={backend!r} is not a known backend",
                hint=f"use one of {', '.join(BACKENDS)} or unset it",
            )
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            key = _ENV_PREFIX + field.upper()
            raise ConfigError(
                f"{key}={values.get(field)!r} is invalid: {err['msg']}",
                hint=f"fix or unset {key}",
            ) from None
