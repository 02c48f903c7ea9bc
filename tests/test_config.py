"""The typed configuration: the documented environment variables, and one-line errors saying how to fix them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctpassport.config import ENV_VARS, Config
from ctpassport.errors import ConfigError


def test_every_field_is_read_from_its_documented_variable(tmp_path: Path) -> None:
    import ctpassport.config as config

    env = {"CTPASSPORT_CACHE_DIR": str(tmp_path / "cache"), "CTPASSPORT_THREADS": "3",
           "CTPASSPORT_BACKEND": "onnxruntime", "CTPASSPORT_SHARED": str(tmp_path), "CTPASSPORT_APP_ROOT": str(tmp_path)}
    cfg = Config.from_env(env)
    assert (cfg.cache_dir, cfg.threads, cfg.backend, cfg.shared_dir, cfg.app_root) == (
        tmp_path / "cache", 3, "onnxruntime", tmp_path, tmp_path)
    assert set(ENV_VARS) == set(Config.model_fields)
    assert all(f"``{name}``" in (config.__doc__ or "") for name in ENV_VARS.values())  # documented
    assert Config.from_env({"CTPASSPORT_SHARED": str(tmp_path)}, shared_dir=tmp_path / "x").shared_dir == tmp_path / "x"


def test_paths_expand_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config.from_env({"CTPASSPORT_CACHE_DIR": "~/c"}).cache_dir == tmp_path / "c"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CTPASSPORT_THREADS": "abc"}, "CTPASSPORT_THREADS='abc' is invalid"),
        ({"CTPASSPORT_THREADS": "-1"}, "CTPASSPORT_THREADS='-1' is invalid"),
        ({"CTPASSPORT_BACKEND": "gpu9"}, "not a known backend"),
        ({"CTPASSPORT_SHARED": "/nonexistent/shared"}, "CTPASSPORT_SHARED='/nonexistent/shared': no such folder"),
        ({"CTPASSPORT_APP_ROOT": "/nonexistent/root"}, "CTPASSPORT_APP_ROOT='/nonexistent/root': no such folder"),
        ({"CTPASSPORT_CACHE_DIR": "{file}"}, "is a file, not a folder"),
        ({"CTPASSPORT_CACHE_DIR": " "}, "CTPASSPORT_CACHE_DIR=' ' is blank"),
        ({"CTPASSPORT_CACHE_DIR": "~nosuchuser_ctp/cache"}, "no such user's home folder"),
        ({"CTPASSPORT_SHARED": "~nosuchuser_ctp/shared"}, "CTPASSPORT_SHARED='~nosuchuser_ctp/shared': no such user"),
    ],
)
def test_bad_settings_name_the_variable_and_the_fix(tmp_path: Path, env: dict[str, str], message: str) -> None:
    (tmp_path / "f").write_text("x")
    env = {k: v.format(file=tmp_path / "f") for k, v in env.items()}
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    text = str(info.value)
    assert message in text and "\n" not in text and ("unset" in text or "point it" in text)


def test_a_config_built_directly_is_checked_too() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a known backend"):
        Config(backend="gpu9")


def test_shared_default_is_beside_the_checkout_or_the_working_folder(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import ctpassport.config as config

    here = Path(config.__file__).resolve().parents[2]
    assert config._default_shared_dir() == (here / ".." / "shared").resolve()  # a source checkout
    fake = tmp_path / "site-packages" / "ctpassport" / "config.py"  # an installed package: no checkout
    monkeypatch.setattr(config, "__file__", str(fake))
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert config._default_shared_dir() == (tmp_path / "work" / "shared").resolve()
