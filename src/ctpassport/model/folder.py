"""Find and load an nnU-Net v2 result folder exactly as TotalSegmentator installs it.

Layout (TotalSegmentator 2.x)::

    $TOTALSEG_HOME_DIR (default ~/.totalsegmentator)
      nnunet/results/                      <- or $TOTALSEG_WEIGHTS_PATH
        Dataset297_TotalSegmentator_total_3mm_1559subj/
          nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/   <- the "trainer folder"
            plans.json  dataset.json  fold_0/checkpoint_final.pth

``plans.json`` may use nnU-Net's older flat keys (``UNet_class_name``, ``UNet_base_num_features``,
``n_conv_per_stage_encoder``, ``pool_op_kernel_sizes``, ``conv_kernel_sizes`` ...) or the newer
``architecture`` block; both are normalised into :class:`Architecture` the way nnU-Net's
``ConfigurationManager`` does.

All geometric fields of :class:`ModelFolder` (``patch_size``, ``spacing``) are in **nnU-Net axis order**;
:attr:`ModelFolder.nnunet_axes` says how that order relates to nibabel's array order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .checkpoint import network_weight_shapes, read_checkpoint_structure

FAST_DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
FAST_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
FAST_PLANS = "nnUNetPlans"
FAST_CONFIGURATION = "3d_fullres"
FAST_TRAINER_FOLDER = f"{FAST_TRAINER}__{FAST_PLANS}__{FAST_CONFIGURATION}"
CHECKPOINT_NAME = "checkpoint_final.pth"

SUPPORTED_NETWORKS = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
SUPPORTED_NORMALIZATION = ("CTNormalization", "ZScoreNormalization", "NoNormalization")
#: Readers whose arrays are in nnU-Net order (z, y, x) = reversed nibabel order.
REVERSED_AXIS_READERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "Tiff3DIO")
#: Readers whose arrays keep nibabel's order.
NIBABEL_AXIS_READERS = ("NibabelIO", "NibabelIOWithReorient")


@dataclass(frozen=True)
class Architecture:
    """Network hyper-parameters in dynamic-network-architectures' vocabulary (``arch_kwargs``)."""

    network_class_name: str
    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    conv_bias: bool = True
    norm_eps: float = 1e-5
    norm_affine: bool = True
    nonlin: str = "torch.nn.LeakyReLU"
    nonlin_kwargs: dict[str, Any] = field(default_factory=lambda: {"inplace": True})
    raw_arch_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        return self.network_class_name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelFolder:
    """A validated nnU-Net result (trainer) folder.

    Geometry is in nnU-Net axis order: see :attr:`nnunet_axes`.
    """

    path: Path
    configuration: str
    plans: dict[str, Any]
    dataset: dict[str, Any]
    architecture: Architecture
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    image_reader_writer: str
    normalization: str
    intensity_properties: dict[str, float]
    labels: dict[int, str]
    checkpoint: Path
    trainer_name: str

    @property
    def num_channels_out(self) -> int:
        """Number of network outputs (background + classes)."""
        return len(self.labels)

    @property
    def nnunet_axes(self) -> tuple[int, int, int]:
        """Permutation from nibabel array axes to nnU-Net axes (``np.transpose`` argument).

        SimpleITK-read plans (TotalSegmentator's) see the reversed order (k, j, i); nibabel-read plans
        see (i, j, k). ``transpose_forward`` is applied on top (identity for TotalSegmentator).
        """
        base = (2, 1, 0) if self.image_reader_writer not in NIBABEL_AXIS_READERS else (0, 1, 2)
        return tuple(base[t] for t in self.transpose_forward)  # type: ignore[return-value]

    @property
    def checkpoint_sha256(self) -> str:
        return file_sha256(self.checkpoint)

    @property
    def network_sha256(self) -> str:
        """SHA-256 of the network definition read from plans.json (class, stages, kernels, strides, norm,
        nonlinearity and their keyword arguments): with the checkpoint hash, what an ONNX export depends on."""
        import dataclasses

        spec = json.dumps(dataclasses.asdict(self.architecture), sort_keys=True, default=str)
        return hashlib.sha256(spec.encode()).hexdigest()

    @property
    def model_id(self) -> str:
        """A short human-readable id: dataset/trainer folder names and the checkpoint hash prefix."""
        return f"{self.path.parent.name}/{self.path.name}@{self.checkpoint_sha256[:12]}"


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (hex), memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _load_json(path: Path, what: str) -> dict[str, Any]:
    from ..io.jsonfile import read_json_object

    return read_json_object(path, what, error=ModelError, hint="point --model at an nnU-Net trainer folder")


def _resolve_configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        known = ", ".join(configs) if isinstance(configs, dict) else "none"
        raise ModelError(f"plans.json has no configuration {name!r} (has: {known})", path)
    conf = dict(configs[name])
    seen = {name}
    while "inherits_from" in conf:  # nnU-Net's configuration inheritance
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelError(f"plans.json configuration {name!r} inherits from unknown {parent!r}", path)
        seen.add(parent)
        merged = dict(configs[parent])
        merged.update(conf)
        conf = merged
    return conf


def parse_architecture(conf: dict[str, Any], path: Path) -> Architecture:
    """Normalise old flat or new ``architecture`` plans into :class:`Architecture`."""
    try:
        if "architecture" in conf:
            arch = conf["architecture"]
            cls = str(arch["network_class_name"])
            kw = dict(arch["arch_kwargs"])
        else:
            unet = str(conf["UNet_class_name"])
            if unet not in SUPPORTED_NETWORKS:
                raise ModelError(f"plans.json names an unknown network class {unet!r}", path,
                                 f"supported: {', '.join(SUPPORTED_NETWORKS)}")
            cls = SUPPORTED_NETWORKS[unet]
            n_stages = len(conf["n_conv_per_stage_encoder"])
            base, cap = int(conf["UNet_base_num_features"]), int(conf["unet_max_num_features"])
            kw = {
                "n_stages": n_stages,
                "features_per_stage": [min(base * 2**i, cap) for i in range(n_stages)],
                "kernel_sizes": conf["conv_kernel_sizes"],
                "strides": conf["pool_op_kernel_sizes"],
                ("n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"):
                    conf["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": conf["n_conv_per_stage_decoder"],
                "conv_bias": True,
                "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            }
    except KeyError as exc:
        raise ModelError(f"plans.json configuration lacks {exc.args[0]!r}", path) from None
    short = cls.rsplit(".", 1)[-1]
    if short not in SUPPORTED_NETWORKS:
        raise ModelError(f"plans.json names an unknown network class {cls!r}", path,
                         f"supported: {', '.join(SUPPORTED_NETWORKS)}")
    try:
        n_stages = int(kw["n_stages"])
        # untyped JSON value (may be None): a bad one raises TypeError/ValueError below -> ModelError
        convs: Any = kw.get("n_conv_per_stage", kw.get("n_blocks_per_stage"))
        arch = Architecture(
            network_class_name=cls,
            n_stages=n_stages,
            features_per_stage=tuple(int(f) for f in kw["features_per_stage"]),
            kernel_sizes=tuple(tuple(int(k) for k in ks) for ks in kw["kernel_sizes"]),
            strides=tuple(tuple(int(s) for s in st) for st in kw["strides"]),
            n_conv_per_stage=tuple(int(c) for c in convs),
            n_conv_per_stage_decoder=tuple(int(c) for c in kw["n_conv_per_stage_decoder"]),
            conv_bias=bool(kw.get("conv_bias", True)),
            norm_eps=float((kw.get("norm_op_kwargs") or {}).get("eps", 1e-5)),
            norm_affine=bool((kw.get("norm_op_kwargs") or {}).get("affine", True)),
            nonlin=str(kw.get("nonlin", "torch.nn.LeakyReLU")),
            nonlin_kwargs=dict(kw.get("nonlin_kwargs") or {}),
            raw_arch_kwargs=kw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"plans.json architecture is malformed ({exc})", path) from None
    if not (len(arch.features_per_stage) == len(arch.kernel_sizes) == len(arch.strides) == n_stages
            == len(arch.n_conv_per_stage) == len(arch.n_conv_per_stage_decoder) + 1) or n_stages < 2:
        raise ModelError("plans.json architecture lists disagree with n_stages (features, kernels, strides and "
                         "convolutions per stage: n_stages each, decoder convolutions: n_stages - 1)", path)
    return arch


def load_model_folder(path: str | Path, *, check_checkpoint: bool = True) -> ModelFolder:
    """Load and validate a trainer folder (``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``).

    Raises :class:`ModelError` with a one-line reason and a fix for anything missing or inconsistent,
    including a JSON value of the wrong kind anywhere the checks below do not name it.
    """
    p = Path(path)
    try:
        return _load_model_folder(p, check_checkpoint)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"plans.json or dataset.json holds a value of the wrong kind ({type(exc).__name__}: "
                         f"{first})", p, "compare with the files TotalSegmentator installs") from None


def _positive_3(values: Any, what: str, path: Path, cast: Any) -> tuple[Any, Any, Any]:
    """Three finite positive numbers from a JSON list (``cast``: int or float), or :class:`ModelError`."""
    import math

    if not isinstance(values, list) or len(values) != 3:
        raise ModelError(f"{what} must be a list of 3 numbers (only 3-D configurations are supported), not "
                         f"{values!r}"[:200], path)
    out = tuple(cast(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ModelError(f"{what} must hold 3 positive numbers, not {list(values)}", path)
    return out[0], out[1], out[2]


def _load_model_folder(p: Path, check_checkpoint: bool) -> ModelFolder:
    """:func:`load_model_folder` without the catch-all for JSON values of the wrong kind."""
    plans_path, dataset_path = p / "plans.json", p / "dataset.json"
    plans = _load_json(plans_path, "plans.json")
    dataset = _load_json(dataset_path, "dataset.json")
    parts = p.name.split("__")
    configuration = parts[2] if len(parts) == 3 else FAST_CONFIGURATION
    conf = _resolve_configuration(plans, configuration, plans_path)
    arch = parse_architecture(conf, plans_path)
    if "patch_size" not in conf or "spacing" not in conf:
        raise ModelError(f"plans.json configuration {configuration!r} lacks patch_size/spacing", plans_path)
    patch = _positive_3(conf["patch_size"], "plans.json patch_size", plans_path, int)
    spacing = _positive_3(conf["spacing"], "plans.json spacing", plans_path, float)
    tf = tuple(int(v) for v in plans.get("transpose_forward", [0, 1, 2]))
    tb = tuple(int(v) for v in plans.get("transpose_backward", [0, 1, 2]))
    if sorted(tf) != [0, 1, 2] or sorted(tb) != [0, 1, 2] or tuple(tf[i] for i in tb) != (0, 1, 2):
        raise ModelError(f"plans.json transpose_forward {list(tf)} / transpose_backward {list(tb)} are not "
                         "inverse permutations of the 3 axes", plans_path)
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in REVERSED_AXIS_READERS + NIBABEL_AXIS_READERS:
        raise ModelError(f"plans.json uses an unsupported image reader {reader!r}", plans_path)
    norms = conf.get("normalization_schemes", ["CTNormalization"])
    if len(norms) != 1 or norms[0] not in SUPPORTED_NORMALIZATION:
        raise ModelError(f"unsupported normalization {norms!r}", plans_path,
                         "ctpassport runs single-channel CT models")
    props = plans_intensity(plans)
    if not isinstance(props, dict):
        raise ModelError(f"plans.json's intensity properties of channel 0 are {type(props).__name__}, not an object",
                         plans_path)
    if norms[0] == "CTNormalization":
        missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5")
                   if not isinstance(props.get(k), (int, float)) or isinstance(props.get(k), bool)]
        if missing:
            raise ModelError(f"plans.json lacks intensity properties {missing} needed by CTNormalization "
                             "(each a number)", plans_path)
        import math

        if not all(math.isfinite(props[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")) \
                or not props["std"] > 0:
            raise ModelError("plans.json's CT intensity properties must be finite numbers with std > 0", plans_path)
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise ModelError(f"dataset.json lists {len(channels)} input channels; ctpassport runs 1-channel CT models",
                         dataset_path)
    raw_labels = dataset.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise ModelError("dataset.json has no 'labels'", dataset_path)
    try:
        labels = {int(v): str(k) for k, v in raw_labels.items()}
    except (TypeError, ValueError):
        raise ModelError("dataset.json 'labels' must map names to integer ids (region models are unsupported)",
                         dataset_path) from None
    if sorted(labels) != list(range(len(labels))):
        raise ModelError("dataset.json label ids must be 0..N-1", dataset_path)
    from .classes import TOTAL_CLASSES

    other = [(k, name) for k, name in sorted(labels.items()) if k and TOTAL_CLASSES.get(k) != name]
    if other or len(labels) != len(TOTAL_CLASSES) + 1:
        k, name = other[0] if other else (len(labels), "?")
        raise ModelError(
            f"dataset.json does not list TotalSegmentator's {len(TOTAL_CLASSES)} 'total' classes ({len(labels) - 1} "
            f"labels; label {k} is {name!r}, expected {TOTAL_CLASSES.get(k)!r}): another model", dataset_path,
            "pass the fast total model (Dataset297) or a TotalSegmentator home dir")
    ckpt = p / "fold_0" / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise ModelError("model folder has no checkpoint", ckpt,
                         "expected fold_0/checkpoint_final.pth; re-install the weights or create stand-ins "
                         "with `ctpassport model standin`")
    trainer_name = parts[0] if parts else FAST_TRAINER
    if check_checkpoint:
        structure = read_checkpoint_structure(ckpt)
        shapes = network_weight_shapes(structure, ckpt)
        trainer_name = str(structure.get("trainer_name", trainer_name))
        head = f"decoder.seg_layers.{arch.n_stages - 2}.weight"
        if head not in shapes:
            raise ModelError(f"checkpoint lacks {head} (its network does not match plans.json)", ckpt)
        if shapes[head][0] != len(labels):
            raise ModelError(
                f"checkpoint predicts {shapes[head][0]} classes but dataset.json lists {len(labels)} labels",
                ckpt, "plans/dataset.json and weights come from different models")
        first = "encoder.stages.0.0.convs.0.conv.weight"
        if first in shapes and shapes[first][0] != arch.features_per_stage[0]:
            raise ModelError(
                f"checkpoint's first stage has {shapes[first][0]} features, plans.json says "
                f"{arch.features_per_stage[0]}", ckpt, "plans.json and weights come from different models")
    return ModelFolder(
        path=p, configuration=configuration, plans=plans, dataset=dataset, architecture=arch,
        patch_size=patch, spacing=spacing, transpose_forward=tf, transpose_backward=tb,
        image_reader_writer=reader, normalization=norms[0],
        intensity_properties={k: float(v) for k, v in props.items() if isinstance(v, (int, float))},
        labels=labels, checkpoint=ckpt, trainer_name=trainer_name,
    )


def weights_dirs(environ: dict[str, str] | None = None) -> list[Path]:
    """Where TotalSegmentator keeps its nnU-Net results, in its own order of precedence."""
    env = dict(os.environ if environ is None else environ)
    if env.get("TOTALSEG_WEIGHTS_PATH"):
        return [Path(env["TOTALSEG_WEIGHTS_PATH"])]
    home = Path(env["TOTALSEG_HOME_DIR"]) if env.get("TOTALSEG_HOME_DIR") else (
        Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return [home / "nnunet" / "results"]


def _trainer_folder_in(results: Path) -> Path | None:
    for cand in (results / FAST_DATASET / FAST_TRAINER_FOLDER,
                 *sorted(results.glob(f"Dataset297_*/{FAST_TRAINER_FOLDER}"))):
        if (cand / "plans.json").is_file():
            return cand
    return None


def is_demo_alias(path: str | Path | None) -> bool:
    """Whether ``path`` is ``demo`` naming the embedded demo model (and not an existing file or folder)."""
    return path is not None and str(path) == "demo" and not Path(path).exists()


def plans_intensity(plans: dict[str, Any]) -> Any:
    """The CT intensity properties (HU: mean, std, percentiles of labelled voxels) of input channel 0 in a
    parsed ``plans.json`` (nnU-Net v2's ``foreground_intensity_properties_per_channel``, v1's ``..._by_modality``),
    as stored: a JSON value, ``{}`` when absent."""
    props_all = plans.get("foreground_intensity_properties_per_channel",
                          plans.get("foreground_intensity_properties_by_modality", {}))
    return props_all.get("0", props_all.get(0, {})) if isinstance(props_all, dict) else {}


def locate_model(path: str | Path | None = None, environ: dict[str, str] | None = None, *,
                 usage: str = "--model") -> Path:
    """Find the fast model's trainer folder.

    ``path`` may be the trainer folder itself (or its ``fold_0`` folder or ``fold_0/checkpoint_final.pth``), a
    TotalSegmentator home dir (or its ``nnunet`` folder), an nnU-Net ``results`` folder or the ``Dataset297_*``
    folder; without it ``$TOTALSEG_WEIGHTS_PATH``, ``$TOTALSEG_HOME_DIR`` and
    ``~/.totalsegmentator`` are searched, like TotalSegmentator does. ``"demo"`` (when no such file or
    folder exists) names the embedded demo model, which does not generalise to real patients. ``usage``: how
    the caller takes a model (``--model`` for most commands), named in the hint when none is found.
    """
    if is_demo_alias(path):
        from .demo import demo_model_dir

        return demo_model_dir()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ModelError("model path does not exist", p)
        if p.is_file() and p.suffix == ".pth":
            if p.name != CHECKPOINT_NAME or p.parent.name != "fold_0":
                raise ModelError(f"ctpassport loads fold_0/{CHECKPOINT_NAME}, as TotalSegmentator does, not this "
                                 "checkpoint", p, "pass the trainer folder (or copy the weights you want there)")
            p = p.parent.parent
        if p.name.startswith("fold_") and (p.parent / "plans.json").is_file():
            if p.name != "fold_0":
                raise ModelError(f"ctpassport loads fold_0/{CHECKPOINT_NAME}, as TotalSegmentator does, not "
                                 f"{p.name}", p, "pass the trainer folder (or copy the weights you want to fold_0)")
            p = p.parent  # the fold folder: its trainer folder
        if (p / "plans.json").is_file():
            return p
        if (p / FAST_TRAINER_FOLDER / "plans.json").is_file():
            return p / FAST_TRAINER_FOLDER  # the Dataset297_* folder
        for results in (p / "nnunet" / "results", p / "results", p):  # a home, its nnunet folder, results
            found = _trainer_folder_in(results)
            if found is not None:
                return found
        raise ModelError("no nnU-Net trainer folder found here", p,
                         "pass the folder holding plans.json, or a TotalSegmentator home dir")
    looked = weights_dirs(environ)
    for results in looked:
        found = _trainer_folder_in(results)
        if found is not None:
            return found
    raise ModelError(
        f"no TotalSegmentator fast-model weights found (looked in {', '.join(str(d) for d in looked)})",
        hint=f"install TotalSegmentator's weights, pass `{usage} PATH`, or make stand-ins with "
             "`ctpassport model standin -o HOME` and set TOTALSEG_HOME_DIR=HOME; "
             f"`{usage} demo` picks the embedded demo model, which only knows the project's phantoms",
    )
