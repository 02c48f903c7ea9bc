"""A tiny model in the fast model's layout, for smoke benchmarks and tests (seconds instead of minutes).

Same plans format, classes (118 outputs), 3 mm spacing and TotalSegmentator home layout as
:func:`ctpassport.model.standin.make_standin`, but a 3-stage PlainConvUNet with 4-8 features and a 32^3
patch: TotalSegmentator and every ctpassport backend run it unchanged, many tiles per CT. Its timings say
nothing about the real model's; use the exact-architecture stand-in for that.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_home(home: str | Path, seed: int = 0) -> Path:
    """Write a TotalSegmentator home dir with the tiny model (random weights, ``seed``); returns ``home``."""
    from ..model.folder import FAST_CONFIGURATION, FAST_DATASET, FAST_TRAINER_FOLDER, parse_architecture
    from ..model.network import build_network, require_torch
    from ..model.standin import make_dataset_json, make_plans, write_model_folder, write_totalseg_home_config

    torch = require_torch("making the tiny model")
    home = Path(home)
    trainer = home / "nnunet" / "results" / FAST_DATASET / FAST_TRAINER_FOLDER
    plans = make_plans(base_features=4, max_features=8, n_stages=3, patch_size=[32, 32, 32])
    dataset = make_dataset_json()
    arch = parse_architecture(plans["configurations"][FAST_CONFIGURATION], trainer / "plans.json")
    torch.manual_seed(seed)
    net = build_network(arch, 1, len(dataset["labels"]))
    write_model_folder(trainer, plans, dataset, net.state_dict(), extra={"ctpassport_standin": {"seed": int(seed)}})
    write_totalseg_home_config(home)
    return home
