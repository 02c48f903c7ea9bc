"""The embedded demo model (an nnU-Net trainer folder shipped with ctpassport) and a TotalSegmentator home for it.

This folder *is* the trainer folder: ``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth`` and its
checked ONNX export ``fold_0/checkpoint_final.onnx``, plus ``MODEL_CARD.md`` (what it was trained on, its Dice
per source; it is a demo that does not generalise) and ``training.json`` / ``evaluation.json``.
It was made by ``ctpassport model train-demo`` (:mod:`ctpassport.model.train`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...errors import ModelError
from ..folder import CHECKPOINT_NAME, FAST_DATASET, FAST_TRAINER_FOLDER

DEMO_DIR = Path(__file__).resolve().parent
_FILES = ("plans.json", "dataset.json", f"fold_0/{CHECKPOINT_NAME}")


def demo_model_dir() -> Path:
    """The shipped demo model's trainer folder; :class:`ModelError` if its files are missing."""
    for rel in _FILES:
        if not (DEMO_DIR / rel).is_file():
            raise ModelError(f"the embedded demo model lacks {rel}", DEMO_DIR,
                             "reinstall ctpassport or run `ctpassport model train-demo`")
    return DEMO_DIR


def make_demo_home(home: str | Path, *, model_dir: str | Path | None = None) -> Path:
    """Build a TotalSegmentator home dir whose fast model is the demo model; returns the trainer folder.

    Layout: ``HOME/nnunet/results/Dataset297_TotalSegmentator_total_3mm_1559subj/
    nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/{plans.json, dataset.json, fold_0/...}``
    plus TotalSegmentator's ``config.json`` (usage statistics off). Set ``TOTALSEG_HOME_DIR=HOME`` before
    importing totalsegmentator, or pass ``--model HOME`` to ctpassport. Files are copied (a few MB).
    """
    from ..standin import write_totalseg_home_config

    src = Path(model_dir) if model_dir is not None else demo_model_dir()
    home = Path(home)
    trainer = home / "nnunet" / "results" / FAST_DATASET / FAST_TRAINER_FOLDER
    (trainer / "fold_0").mkdir(parents=True, exist_ok=True)
    for rel in (*_FILES, "fold_0/checkpoint_final.onnx"):
        if (src / rel).is_file():
            shutil.copy2(src / rel, trainer / rel)
    write_totalseg_home_config(home)
    return trainer
