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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

#: The environment variable of each :class:`Config` field (the documented names, not derived from the fields).
ENV_VARS = {
    "cache_dir": "CTPASSPORT_CACHE_DIR",
    "threads": "CTPASSPORT_THREADS",
    "backend": "CTPASSPORT_BACKEND",
    "shared_dir": "CTPASSPORT_SHARED",
    "app_root": "CTPASSPORT_APP_ROOT",
}
BACKENDS = ("auto", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8", "cuda", "torch")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "ctpassport"


def _default_shared_dir() -> Path:
    """``../shared`` beside the source checkout (src/ctpassport/config.py -> its root is parents[2]); for an
    installed (non-editable) package, which has no checkout, ``../shared`` from the working folder."""
    root = Path(__file__).resolve().parents[2]
    base = root if (root / "pyproject.toml").is_file() else Path.cwd()
    return (base / ".." / "shared").resolve()


class Config(BaseModel):
    """Settings of one ctpassport run. Build it with :meth:`from_env`; fields are immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    threads: int = Field(default=0, ge=0, le=1024)
    backend: str = "auto"
    shared_dir: Path = Field(default_factory=_default_shared_dir)
    app_root: Path | None = None

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"not a known backend (use one of {', '.join(BACKENDS)})")
        return v

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
        from_env: set[str] = set()
        for name in cls.model_fields:
            key = ENV_VARS[name]
            if key in env and env[key] != "":
                values[name] = env[key]
                from_env.add(name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        from_env -= {k for k, v in overrides.items() if v is not None}
        backend = values.get("backend")
        if backend is not None and str(backend) not in BACKENDS:
            raise ConfigError(
                f"CTPASSPORT_BACKEND={backend!r} is not a known backend",
                hint=f"use one of {', '.join(BACKENDS)} or unset it",
            )
        for name in ("cache_dir", "shared_dir", "app_root"):
            raw = values.get(name)
            if isinstance(raw, str):
                key = ENV_VARS[name]
                if not raw.strip():
                    raise ConfigError(f"{key}={raw!r} is blank", hint=f"name a folder or unset {key}")
                try:
                    values[name] = Path(raw).expanduser()
                except RuntimeError:  # "~user" of no such user
                    raise ConfigError(f"{key}={raw!r}: no such user's home folder",
                                      hint=f"write the folder's full path or unset {key}") from None
        try:
            cfg = cls(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            key = ENV_VARS.get(field, field)
            raise ConfigError(
                f"{key}={values.get(field)!r} is invalid: {err['msg']}",
                hint=f"fix or unset {key}",
            ) from None
        if cfg.cache_dir.exists() and not cfg.cache_dir.is_dir():
            raise ConfigError(f"CTPASSPORT_CACHE_DIR={str(cfg.cache_dir)!r} is a file, not a folder",
                              hint="point it at a folder (created when missing) or unset it")
        for name in ("shared_dir", "app_root"):
            path = getattr(cfg, name)
            if name in from_env and path is not None and not path.is_dir():
                raise ConfigError(f"{ENV_VARS[name]}={str(path)!r}: no such folder",
                                  hint=f"point it at an existing folder or unset {ENV_VARS[name]}")
        return cfg
