"""ONNX export: checker, numerical agreement with PyTorch (random patch and real CT), caching by hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctpassport.model.export import EXPORT_ATOL, cached_onnx_path, find_or_export_onnx, onnx_metadata
from ctpassport.model.folder import load_model_folder, locate_model

pytestmark = pytest.mark.torch


def test_export_is_cached_and_checked(standin_home: Path, onnx_cache: Path) -> None:
    import onnx

    model = load_model_folder(locate_model(standin_home))
    path = find_or_export_onnx(model, onnx_cache)
    assert path == cached_onnx_path(model, onnx_cache)
    onnx.checker.check_model(str(path))
    meta = onnx_metadata(path)
    assert meta["checkpoint_sha256"] == model.checkpoint_sha256
    report = path.with_suffix(".json").read_text()
    assert '"max_abs_diff"' in report
    proto = onnx.load(str(path), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 1 and all(isinstance(d, str) for d in dims[2:])  # dynamic spatial axes
    mtime = path.stat().st_mtime_ns
    assert find_or_export_onnx(model, onnx_cache) == path
    assert path.stat().st_mtime_ns == mtime  # exported once per checkpoint, not per call


def test_an_export_is_not_reused_for_another_network_definition(standin_home: Path, onnx_cache: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checkpoint under a plans.json that defines another network (here LeakyReLU's slope) is another
    export: an ONNX file recorded for the first definition (shipped beside the checkpoint or cached) is not
    used for it (it was: the cache was keyed by the checkpoint alone)."""
    import dataclasses
    import shutil

    import ctpassport.model.export as export

    model = load_model_folder(locate_model(standin_home))
    exported = find_or_export_onnx(model, onnx_cache)
    assert onnx_metadata(exported)["network_sha256"] == model.network_sha256
    copy = tmp_path / "home"
    shutil.copytree(standin_home, copy)
    moved = load_model_folder(locate_model(copy))
    shutil.copy(exported, moved.checkpoint.with_suffix(".onnx"))  # shipped beside the checkpoint
    assert find_or_export_onnx(moved, onnx_cache) == moved.checkpoint.with_suffix(".onnx")  # same definition
    arch = dataclasses.replace(moved.architecture, nonlin_kwargs={"inplace": True, "negative_slope": 0.5})
    other = dataclasses.replace(moved, architecture=arch)
    assert other.network_sha256 != model.network_sha256
    assert cached_onnx_path(other, onnx_cache) != cached_onnx_path(model, onnx_cache)

    class Exported(Exception):
        pass

    def fake_export(*_a: object, **_k: object) -> None:
        raise Exported

    monkeypatch.setattr(export, "export_onnx", fake_export)
    with pytest.raises(Exported):  # neither file is taken for the other definition: it is exported anew
        find_or_export_onnx(other, onnx_cache)
    # a file that records no network definition (an older export) is not taken for any
    import onnx

    proto = onnx.load(str(moved.checkpoint.with_suffix(".onnx")))
    keep = [p for p in proto.metadata_props if p.key != "network_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, str(moved.checkpoint.with_suffix(".onnx")))
    with pytest.raises(Exported):
        find_or_export_onnx(moved, tmp_path / "empty_cache")


def test_the_shipped_demo_onnx_records_its_network() -> None:
    from ctpassport.model.demo import demo_model_dir

    model = load_model_folder(demo_model_dir())
    meta = onnx_metadata(model.checkpoint.with_suffix(".onnx"))
    assert meta["network_sha256"] == model.network_sha256 and meta["checkpoint_sha256"] == model.checkpoint_sha256


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_ct(segmenter, example_ct: Path) -> None:  # type: ignore[no-untyped-def]
    """Logits of ONNX Runtime and PyTorch on a normalised real-CT patch agree within EXPORT_ATOL."""
    import torch

    from ctpassport.io.nifti import read_image
    from ctpassport.model.network import load_network

    _, net_in = segmenter.preprocess(read_image(example_ct))
    # a 64 x 96 x 96 block of the normalised CT (multiples of the total stride 16), nnU-Net order
    x = np.ascontiguousarray(net_in.data[None, :, 24:88, :96, 16:112])
    got = segmenter.backend(x)
    with torch.inference_mode():
        ref = load_network(segmenter.model)(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - ref).max())
    assert diff <= EXPORT_ATOL, diff
    # and the decision is the same almost everywhere (ties between near-equal logits may flip)
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_export_command_checks_the_names_it_writes(tmp_path: Path) -> None:
    """``-o X.onnx`` also writes ``X.json`` (the check report): neither is overwritten without --force."""
    from typer.testing import CliRunner

    from ctpassport.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["model", "export", "demo", "-o", str(tmp_path / "m.json"), "-q"])
    assert res.exit_code == 2 and "must end with .onnx" in res.stderr
    (tmp_path / "m.json").write_text('{"mine": 1}')
    res = runner.invoke(app, ["model", "export", "demo", "-o", str(tmp_path / "m.onnx"), "-q"])
    assert res.exit_code == 4 and "m.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (tmp_path / "m.json").read_text() == '{"mine": 1}' and not (tmp_path / "m.onnx").exists()
