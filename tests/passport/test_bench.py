"""The passport speed benchmark runs and reports what it measured (no timing is asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

from ctpassport.passport.bench import main, passport_speed


def test_passport_speed_report(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    rep = passport_speed(repeats_3mm=2, repeats_full=1, shape_3mm=(45, 45, 79), shape_full=(90, 90, 100),
                         points=50, out_path=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    for name in ("3mm", "full"):
        e = rep["maps"][name]
        assert e["labels_present"] == e["organs"] == 117  # every class of the synthetic torso is present
        assert e["memory_order"] == "F"
        assert e["build_passport"]["repeats"] == len(e["build_passport"]["all_s"])
        assert e["build_passport"]["median_s"] > 0 and e["ratios"]["time_over_budget"] > 0
        assert e["build_passport_with_normals"]["median_s"] > 0 and e["ratios"]["with_normals_over_ours"] > 0
    assert rep["maps"]["3mm"]["ratios"]["naive_over_ours"] > 0
    assert rep["maps"]["full"]["shape"] == [90, 90, 100]


def test_main_quick_prints(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import functools

    from ctpassport.passport import bench

    monkeypatch.setattr(bench, "passport_speed",
                        functools.partial(passport_speed, shape_3mm=(30, 30, 50), shape_full=(40, 40, 60)))
    assert main(["--quick", "-o", str(tmp_path / "q.json")]) == 0
    assert "build_passport median" in capsys.readouterr().out
    assert (tmp_path / "q.json").is_file()
