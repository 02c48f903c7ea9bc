"""ITK/SimpleITK and NIfTI input/output of transforms, with explicit RAS <-> LPS conversion.

ITK (SimpleITK, ANTs, elastix, 3D Slicer's files) uses LPS+ physical coordinates; ctpassport uses RAS+.
``FLIP = diag(-1, -1, 1)`` converts points (``x_lps = FLIP @ x_ras``) and vectors alike, so a RAS rigid
``y = R x + t`` is the LPS rigid ``y = (F R F) x + F t`` and a RAS displacement ``u(x)`` is the LPS
displacement ``F u(F x)``.

Files:

* ``transform.h5``: an ITK composite transform ``[AffineTransform (rigid), DisplacementFieldTransform]``
  (the field only for the deformable tier). ITK applies the stack last-first, so a fixed-space LPS point
  ``p`` maps to ``rigid(p + u(p))`` in the moving space: the pull-back transform that ``sitk.Resample`` and
  ``antsApplyTransforms -r fixed -i moving -t transform.h5`` expect.
* ``displacement.nii.gz``: the *whole* transform (rigid included) as one displacement field on the fixed
  grid, ``T(x) = x + D(x)``, in the ITK/ANTs convention: a 5-D NIfTI ``(nx, ny, nz, 1, 3)`` (the grid's array
  axes ``[i, j, k]``, an empty time axis, the vector components) float32 with
  intent code 1007 ("vector", what ITK and ANTs write for their own fields) whose vector components are
  **LPS** mm (negate the first two components for RAS). Not intent 1006 ("displacement vector"): ITK 5.3+
  assumes RAS components for that code and converts them, older ITK/ANTs builds do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path
from .transform import DisplacementField, GridSpec, RigidTransform, Transform

FLIP = np.diag([-1.0, -1.0, 1.0])

#: NIfTI intent code written for the field (NIFTI_INTENT_VECTOR: components in ITK's LPS, as ITK writes).
NIFTI_INTENT_VECTOR = 1007


def _sitk() -> Any:
    import SimpleITK as sitk

    return sitk


def grid_direction_lps(grid: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin (LPS+ mm), spacing (mm per array axis), direction (3x3, columns: the unit array axes in LPS+))
    of ``grid`` in ITK's physical space, as ``SetOrigin``/``SetSpacing``/``SetDirection`` take them.

    Raises :class:`InputError` for sheared grids, which ITK images cannot represent.
    """
    sp = grid.spacing
    axes = grid.affine[:3, :3] / sp
    if grid.sheared:
        raise InputError(
            "the fixed grid has a sheared (non-orthogonal) affine, which ITK transforms cannot represent"
        )
    return FLIP @ grid.affine[:3, 3], sp, FLIP @ axes


def grid_from_sitk(image: Any) -> GridSpec:
    """:class:`GridSpec` (voxel -> RAS+ mm) of a SimpleITK image, with voxel axes in (x, y, z) index order."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = FLIP @ direction @ np.diag(spacing)
    aff[:3, 3] = FLIP @ origin
    return GridSpec(tuple(int(s) for s in image.GetSize()), aff)  # type: ignore[arg-type]


def array_to_sitk(data: np.ndarray, grid: GridSpec, *, vector: bool = False) -> Any:
    """A SimpleITK image of ``data`` (``[i, j, k]`` storage order, or ``[i, j, k, c]`` when ``vector``) on
    ``grid``. Vector components are copied as they are (convert RAS vectors to LPS first)."""
    sitk = _sitk()
    arr = np.asarray(data)
    arr = np.ascontiguousarray(arr.transpose(2, 1, 0, 3) if vector else arr.transpose(2, 1, 0))
    img = sitk.GetImageFromArray(arr, isVector=vector)
    origin, spacing, direction = grid_direction_lps(grid)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def sitk_to_array(image: Any) -> np.ndarray:
    """The voxel array of a SimpleITK image in ``[i, j, k]`` (``[i, j, k, c]`` for vectors) order."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(image)
    return arr.transpose(2, 1, 0, 3) if image.GetNumberOfComponentsPerPixel() > 1 else arr.transpose(2, 1, 0)


def rigid_to_sitk(rigid: RigidTransform) -> Any:
    """A SimpleITK ``AffineTransform`` (LPS) equal to ``rigid`` (RAS): ``A = F R F``, ``b = F t``."""
    sitk = _sitk()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in (FLIP @ rigid.rotation @ FLIP).ravel()))
    tx.SetTranslation(tuple(float(v) for v in FLIP @ rigid.translation))
    tx.SetCenter((0.0, 0.0, 0.0))
    return tx


def field_to_sitk(field: DisplacementField) -> Any:
    """A SimpleITK ``DisplacementFieldTransform`` (LPS vectors, linear interpolation) equal to ``field``."""
    sitk = _sitk()
    img = array_to_sitk(field.data.astype(np.float64) @ FLIP, field.grid, vector=True)
    tx = sitk.DisplacementFieldTransform(img)  # takes the image over (the python image becomes empty)
    tx.SetInterpolator(sitk.sitkLinear)
    return tx


def to_sitk(transform: Transform) -> Any:
    """The SimpleITK ``CompositeTransform`` ``[rigid, field]`` of ``transform`` (fixed -> moving, LPS)."""
    sitk = _sitk()
    parts = [rigid_to_sitk(transform.rigid)]
    if transform.field is not None:
        parts.append(field_to_sitk(transform.field))
    return sitk.CompositeTransform(parts)


def _rigid_from_sitk(tx: Any, path: Path) -> RigidTransform:
    sitk = _sitk()
    name = tx.GetName()
    try:
        aff = sitk.AffineTransform(tx) if name == "AffineTransform" else None
    except RuntimeError:
        aff = None
    if aff is None:
        # Any matrix-offset transform (Euler3D, VersorRigid3D, Similarity3D, ...): read via GetMatrix/Center.
        for cast in (
            sitk.Euler3DTransform,
            sitk.VersorRigid3DTransform,
            sitk.Similarity3DTransform,
            sitk.ScaleVersor3DTransform,
            sitk.TranslationTransform,
        ):
            try:
                aff = cast(tx)
                break
            except (RuntimeError, TypeError):
                continue
    if aff is None:
        raise InputError(f"unsupported transform type {name} (expected a rigid/affine transform)", path)
    if isinstance(aff, sitk.TranslationTransform):
        m = np.eye(3)
        off = np.asarray(aff.GetOffset(), dtype=np.float64)
    else:
        m = np.asarray(aff.GetMatrix(), dtype=np.float64).reshape(3, 3)
        c = np.asarray(aff.GetCenter(), dtype=np.float64)
        off = np.asarray(aff.GetTranslation(), dtype=np.float64) + c - m @ c
    if not np.allclose(m.T @ m, np.eye(3), atol=1e-5) or np.linalg.det(m) < 0:
        raise InputError("the linear part of the transform is not a rotation (scaling or shear)", path)
    return RigidTransform(FLIP @ m @ FLIP, FLIP @ off)


def _field_from_sitk(tx: Any, path: Path) -> DisplacementField:
    sitk = _sitk()
    dft = sitk.DisplacementFieldTransform(tx)
    img = dft.GetDisplacementField()
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("the displacement field is not a 3-D field of 3-vectors", path)
    data = sitk_to_array(img).astype(np.float64) @ FLIP
    return DisplacementField(grid_from_sitk(img), data.astype(np.float32))


def write_itk_transform(transform: Transform, path: str | Path) -> Path:
    """Write ``transform`` (RAS+ mm, fixed -> moving) as an ITK composite transform file in LPS (``.h5`` HDF5,
    read by SimpleITK and ANTs)."""
    sitk = _sitk()
    p = Path(path)
    with atomic_path(p) as tmp:
        sitk.WriteTransform(to_sitk(transform), str(tmp))
    return p


def read_itk_transform(path: str | Path) -> Transform:
    """Read a transform file written by :func:`write_itk_transform` (or any ITK file holding rigid transforms
    optionally followed by one displacement field) as a RAS+ :class:`Transform`.

    A composite of several rigid (or translation, Euler, versor...) transforms, e.g. an initial alignment and
    an optimised one, is composed the way ITK applies a composite: the last one first."""
    sitk = _sitk()
    p = Path(path)
    if not p.is_file():
        raise InputError("no such transform file", p)
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["unreadable"])[-1][:200]
        raise InputError(f"not a readable ITK transform file ({first})", p) from None
    parts: list[Any] = []
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        comp.FlattenTransform()
        parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    else:
        parts = [tx]
    if not parts:
        raise InputError("expected a rigid transform optionally followed by a displacement field, found none", p)
    kinds = [t.GetName() for t in parts]
    n_fields = kinds.count("DisplacementFieldTransform")
    if n_fields > 1:
        raise InputError(f"holds {n_fields} displacement fields; ctpassport reads rigid transforms followed by "
                         "at most one", p)
    if n_fields and kinds[-1] != "DisplacementFieldTransform":
        raise InputError("the displacement field must come after the rigid transforms in the file", p)
    field = _field_from_sitk(parts[-1], p) if n_fields else None
    # ITK applies a composite last-first: p -> T_0(T_1(...T_{n-1}(p))), so compose from the last linear part
    matrix = np.eye(4)
    for t in parts[: len(parts) - n_fields]:
        matrix = matrix @ _rigid_from_sitk(t, p).matrix
    return Transform(RigidTransform.from_matrix(matrix) if len(parts) > n_fields else RigidTransform.identity(),
                     field)


def write_displacement_nifti(transform: Transform, grid: GridSpec, path: str | Path) -> Path:
    """Write the whole ``transform`` as a displacement field ``D = T(x) - x`` on ``grid`` (module doc:
    5-D NIfTI, float32, LPS vector components, intent vector)."""
    import nibabel as nib

    from ..io.nifti import save_nifti

    d = transform.displacement_on(grid) @ FLIP.astype(np.float32)
    img = nib.Nifti1Image(d[:, :, :, None, :].astype(np.float32), grid.affine)
    img.header.set_intent(NIFTI_INTENT_VECTOR, (), name="T(x)-x LPS mm")
    img.set_sform(grid.affine, code=1)
    img.set_qform(grid.affine, code=1)
    img.header["descrip"] = b"ctpassport pull-back T(x)=x+D(x), D in LPS mm"
    return save_nifti(img, path)


def read_displacement_nifti(path: str | Path) -> tuple[np.ndarray, GridSpec]:
    """Read a field written by :func:`write_displacement_nifti`: ``(D_ras, grid)``, ``D_ras`` float32
    ``(*grid.shape, 3)`` (array axes ``[i, j, k]``, then RAS+ x, y, z components in mm), ``grid`` the file's
    voxel -> RAS+ mm grid. Components are taken as LPS (ITK's convention) and negated in x and y, except for
    intent 1006 ("displacement vector"), which the NIfTI standard defines in RAS."""
    from ..io.nifti import load_nifti, validate_affine

    p = Path(path)
    img = load_nifti(p)
    shape = img.shape
    if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
        raise InputError(f"not a 3-D displacement field (shape {shape}, expected (nx, ny, nz, 1, 3))", p)
    d = np.asarray(img.get_fdata(dtype=np.float32))[:, :, :, 0, :]
    if int(img.header["intent_code"]) != 1006:  # 1006: RAS components by the NIfTI standard; else ITK's LPS
        d = d @ FLIP.astype(np.float32)
    return d, GridSpec(shape[:3], validate_affine(img.affine, p))
