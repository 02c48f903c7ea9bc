"""Build anatomical passports from label maps in one pass over the volume.

Frames and units: label maps are arrays ``labels[i, j, k]`` in nibabel storage order with their
voxel -> RAS+ world (mm) affine; every output coordinate is world mm in RAS+ (see :mod:`.schema`).

Algorithm (one pass over the volume, then work proportional to each organ's bounding box):

1. ``scipy.ndimage.find_objects`` finds the bounding box of every label in one C pass (run on the
   C-contiguous view of the array: a Fortran-ordered array, as nibabel loads it, is processed through its
   transpose with the affine's columns permuted to match, so no copy is made).
2. Per label, inside its bounding box (plus one voxel of margin): the mask ``crop == id``, its three 2-D
   projections (voxel counts summed along one axis), from which the count, the first and the second
   moments follow exactly (integer sums). The centroid and covariance are transformed to world mm with the
   affine: ``c = A v + t``, ``C = A C_vox A^T`` (exact for any affine, oblique included).
3. Surface voxels: inside the organ with at least one of their 6 face neighbours *inside the image* not in
   the organ (another label or background). **The image border is not a surface**: an organ cut by the
   field of view has no surface on the cut (those organs are flagged ``truncated``).
4. Boundary points: a deterministic, stratified sample of the surface voxels' centres, for all organs in
   one vectorised pass (see :func:`sample_surfaces`), done along the grid's nearest RAS+ axes: the same
   label map stored another way (LPS, permuted axes) gives the same world points.

Definitions used in the passport:

* ``volume_mm3`` = voxel count x ``|det(A[:3, :3])|`` (the exact voxel volume, also for sheared affines);
* ``truncated``: the organ has a voxel on the outermost voxel layer of the volume (any of the 6 faces);
* ``hu_mean`` / ``hu_std``: mean and population standard deviation (``ddof=0``) of the CT inside the organ,
  the CT being on the label map's grid;
* a one-voxel organ has a zero covariance (``np.cov`` is undefined for one sample).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io.nifti import read_image, spacing_from_affine, validate_affine
from ..io.orientation import axcodes, onto_grid
from ..model.classes import TOTAL_CLASSES
from .schema import BODY_ID, BODY_NAME, Grid, Organ, Passport, Source, save_passport

#: Boundary point coordinates are rounded to this many decimals (mm): 1 micrometre.
POINT_DECIMALS = 3
#: Label ids up to this value go to ``find_objects`` directly; larger ids are renumbered first.
MAX_DIRECT_LABEL = 1 << 16


class PassportWarning(UserWarning):
    """Something worth knowing about a passport that does not stop it being built (e.g. no organs)."""


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_label_array(labels: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Validate a label map: 3-D, integer (or boolean), no negative ids. Returns it (bool -> uint8).

    Raises :class:`InputError` with one line naming ``path`` (when given) and the problem.
    """
    arr = np.asanyarray(labels)
    if arr.ndim != 3:
        raise InputError(f"label map is {arr.ndim}-D with shape {arr.shape}, expected 3-D", path)
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"label map has {arr.dtype} voxels, expected integer label ids", path,
                         "save it with an integer data type (e.g. uint8, uint16)")
    if min(arr.shape) < 1:
        raise InputError(f"label map has an empty axis (shape {arr.shape})", path)
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and int(arr.min()) < 0:
        raise InputError(f"label map has negative label ids (min {int(arr.min())})", path)
    return arr


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# per-organ geometry
# ------------------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of an integer (pure Python, exact)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _seed_key(seed: int, label: int) -> int:
    """The sampling key of one organ: a hash of the passport seed and the label id."""
    return _mix64(int(seed) * 0x9E3779B97F4A7C15 + int(label) * 0xD1B54A32D192ED03 + 1)


@functools.lru_cache(maxsize=256)
def _spread_table(shift: int) -> np.ndarray:
    """``T[x]`` = the 11 bits of ``x`` spread to every third bit (Morton interleaving), shifted left by
    ``shift`` (< 64) bits; uint64, read-only."""
    x = np.arange(2048, dtype=np.uint64)
    out = np.zeros(2048, dtype=np.uint64)
    for b in range(11):
        if 3 * b + shift < 64:
            out |= ((x >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + shift)
    out.setflags(write=False)
    return out


def _spread(x: np.ndarray, shift: int, big: bool) -> np.ndarray:
    if not big:
        return np.take(_spread_table(shift), x)
    return np.take(_spread_table(shift), x & 2047) | np.take(_spread_table(shift + 33), x >> 11)


def _canonical_boxes(coords: list[np.ndarray], spacing: tuple[float, ...], affine: np.ndarray,
                     extents: list[list[int]], sizes: list[int]
                     ) -> tuple[list[np.ndarray], tuple[float, ...], list[tuple[int, int, int]]]:
    """Box coordinates along the original array axes -> along the grid's nearest RAS+ axes (axes permuted,
    flipped ones counted from the box's far side), with spacing and box extents to match.

    :func:`sample_surfaces` then sees the same voxel sets however the label map is stored (RAS, LPS, axes
    permuted...), so the same seed picks the same world points for any storage of one grid.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # original axis a -> (RAS axis, +1/-1)
    ext = np.asarray(extents, dtype=np.int64).reshape(-1, 3)
    out: list[np.ndarray] = [np.empty(0, dtype=np.intp)] * 3
    sp = [0.0, 0.0, 0.0]
    ex = np.zeros_like(ext)
    for a in range(3):
        b = int(ornt[a, 0])
        c = coords[a]
        if ornt[a, 1] < 0:
            c = np.repeat(ext[:, a] - 1, sizes).astype(c.dtype, copy=False) - c
        out[b], sp[b], ex[:, b] = c, float(spacing[a]), ext[:, a]
    return out, tuple(sp), [(int(e[0]), int(e[1]), int(e[2])) for e in ex]


def sample_surfaces(coords: list[np.ndarray], sizes: list[int] | np.ndarray, spacing: np.ndarray | tuple[float, ...],
                    n: int, keys: list[int], extents: list[tuple[int, int, int]] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``n`` well-spread surface voxels of each of several organs at once (vectorised).

    ``coords``: three non-negative int arrays, the surface voxel indices along the *original* array axes of
    all organs one after the other (relative to any fixed origin per organ, e.g. its bounding box corner);
    ``sizes[g]``: the number of voxels of organ ``g``; ``spacing``: mm per original axis; ``keys[g]``: the
    seed of organ ``g`` (a hash of the passport seed and the label id); ``extents[g]``: an upper bound of
    organ ``g``'s coordinates per axis (default: the coordinates' maxima + 1). Returns ``(rows, counts)``:
    ``rows`` indexes ``coords`` (organ by organ, each organ's rows in curve order),
    ``counts[g] = min(n, sizes[g])``.

    Stratified sampling along a Z-order (Morton) space-filling curve: each organ's voxels, with each axis
    stretched by the whole multiple of the smallest voxel size nearest to its own (so that anisotropic
    voxels count by their size in mm), are sorted along the curve (one value sort for all organs: organ,
    Morton code and row packed in one 64-bit key); the sorted list is cut into ``n`` runs of equal length
    (equal numbers of surface voxels, i.e. about equal areas, mostly compact patches because the curve
    preserves locality) and one voxel is taken from each run at the same seeded random offset within the
    run (systematic sampling). Every part of the surface gets its share of points, without the clusters and
    holes of independent random draws. The result depends only on the voxel sets and the keys: never on the
    memory layout or the affine. Organs with at most ``n`` voxels keep them all (in curve order).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n_groups = len(sizes)
    total = int(sizes.sum())
    if total == 0 or n <= 0:
        return np.zeros(0, dtype=np.intp), np.zeros(n_groups, dtype=np.int64)
    sp = [float(v) for v in spacing]
    ratio = [max(1, round(v / min(sp))) for v in sp]  # whole multiples of the smallest voxel size
    q = [c.astype(np.intp, copy=False) if r == 1 else c.astype(np.intp) * r for c, r in zip(coords, ratio)]
    if extents is None:
        top = max(int(c.max()) for c in q)
    else:
        top = int(max((e[b] - 1) * ratio[b] for e in extents for b in range(3)))
    if top >= 1 << 21:
        raise ValueError("coordinates must lie in [0, 2**21) after scaling to the smallest voxel size")
    big = top >= 2048
    bits_m = 3 * max(top.bit_length(), 1)
    bits_g = (n_groups - 1).bit_length()
    bits_i = max((total - 1).bit_length(), 1)
    starts = np.cumsum(sizes) - sizes
    if bits_g + bits_m + bits_i <= 64:  # one fast value sort: organ | Morton code | row
        packed = _spread(q[0], 2 + bits_i, big)
        packed |= _spread(q[1], 1 + bits_i, big)
        packed |= _spread(q[2], bits_i, big)
        if bits_g:
            packed |= np.repeat(np.arange(n_groups, dtype=np.uint64) << np.uint64(bits_m + bits_i), sizes)
        packed |= np.arange(total, dtype=np.uint64)
        packed.sort()
        order = (packed & np.uint64((1 << bits_i) - 1)).astype(np.intp)
    else:  # too many bits for one key (very anisotropic or huge grids): one argsort per organ
        morton = _spread(q[0], 2, big) | _spread(q[1], 1, big) | _spread(q[2], 0, big)
        order = np.concatenate([st + np.argsort(morton[st:st + sz], kind="stable")
                                for st, sz in zip(starts.tolist(), sizes.tolist())]).astype(np.intp)
    counts = np.minimum(sizes, n)
    grp = np.repeat(np.arange(n_groups), counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    u = np.array([(_mix64(int(k)) >> 11) * 2.0**-53 for k in keys])  # seeded offsets in [0, 1)
    size_g = sizes[grp]
    step = np.where(size_g > n, ((within + u[grp]) * (size_g / n)).astype(np.int64), within)
    return order[starts[grp] + step], counts


def sample_surface(coords: list[np.ndarray], spacing: np.ndarray | tuple[float, ...], n: int, key: int = 0,
                   extent: tuple[int, int, int] | None = None) -> np.ndarray:
    """Choose ``n`` well-spread surface voxels of one organ; returns their row indices (in curve order).

    ``coords``: three non-negative int arrays (original axes); see :func:`sample_surfaces` (this is its
    one-organ case) for the method and the arguments.
    """
    rows, _ = sample_surfaces(list(coords), [len(coords[0])], spacing, n, [key],
                              None if extent is None else [extent])
    return rows


@dataclass
class _OrganGeometry:
    label: int
    count: int
    centroid_vox: np.ndarray  # voxel coordinates in the working frame
    cov_vox: np.ndarray  # voxel^2, ddof=1
    bbox_lo: tuple[int, int, int]  # working-frame voxel index, inclusive
    bbox_hi: tuple[int, int, int]
    truncated: bool
    surface: tuple[np.ndarray, ...]  # surface voxel indices, bounding-box coordinates, working axes
    box_shape: tuple[int, int, int]  # the bounding box's shape (working axes)
    extreme_vox: np.ndarray | None  # candidates for the world bounding box (oblique affines)
    hu: tuple[float, float] | None


@functools.lru_cache(maxsize=2048)
def _vander(n: int) -> np.ndarray:
    """``[1, i, i^2]`` for ``i = 0..n-1`` as an ``(n, 3)`` float64 array (read-only, cached)."""
    i = np.arange(n, dtype=np.float64)
    v = np.stack([np.ones(n), i, i * i], axis=1)
    v.setflags(write=False)
    return v


_EINSUM_SUB = ("ijk->jk", "ijk->ik", "ijk->ij")


def _project(m_u8: np.ndarray, axis: int) -> np.ndarray:
    """Voxel counts of a 0/1 uint8 mask summed along ``axis`` (uint8 einsum in chunks of <= 255, exact)."""
    n = m_u8.shape[axis]
    if n <= 255:
        return np.einsum(_EINSUM_SUB[axis], m_u8)
    acc = np.uint16 if n < 65536 else np.int64
    out = None
    for a in range(0, n, 255):
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = slice(a, min(a + 255, n))
        part = np.einsum(_EINSUM_SUB[axis], m_u8[tuple(idx)]).astype(acc)
        out = part if out is None else out + part
    return out  # type: ignore[return-value]


def _moments(m_u8: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, centroid and covariance (ddof=1) of a 0/1 uint8 mask in its local voxel frame.

    From the three 2-D projections (voxel counts along one axis): ``Vi^T P_ij Vj`` holds every
    ``sum i^a j^b`` for ``a, b <= 2``; all sums are integers, exact in float64.
    """
    ni, nj, nk = m_u8.shape
    vi, vj, vk = _vander(ni), _vander(nj), _vander(nk)
    m01 = vi.T @ _project(m_u8, 2) @ vj  # sum i^a j^b
    m02 = vi.T @ _project(m_u8, 1) @ vk  # sum i^a k^b
    sjk = vj[:, 1] @ _project(m_u8, 0) @ vk[:, 1]
    n = m01[0, 0]
    mean = np.array([m01[1, 0], m01[0, 1], m02[0, 1]]) / n
    second = np.array([[m01[2, 0], m01[1, 1], m02[1, 1]],
                       [m01[1, 1], m01[0, 2], sjk],
                       [m02[1, 1], sjk, m02[0, 2]]])
    cov = (second - n * np.outer(mean, mean)) / (n - 1.0) if n > 1 else np.zeros((3, 3))
    return int(n), mean, cov


def _organ_geometry(work: np.ndarray, label: int, sl: tuple[slice, ...], ct: np.ndarray | None,
                    need_extremes: bool) -> _OrganGeometry:
    """Moments, surface voxels and extremes of one label inside its bounding box ``sl`` (working frame)."""
    n0, n1, n2 = work.shape
    s0, s1, s2 = sl
    lo = (s0.start, s1.start, s2.start)
    hi = (s0.stop, s1.stop, s2.stop)
    clip_lo = (int(lo[0] == 0), int(lo[1] == 0), int(lo[2] == 0))  # the image border stops the margin
    clip_hi = (int(hi[0] == n0), int(hi[1] == n1), int(hi[2] == n2))
    ext = work[lo[0] - 1 + clip_lo[0]:hi[0] + 1 - clip_hi[0], lo[1] - 1 + clip_lo[1]:hi[1] + 1 - clip_hi[1],
               lo[2] - 1 + clip_lo[2]:hi[2] + 1 - clip_hi[2]] == label
    truncated = any(clip_lo) or any(clip_hi)
    if truncated:  # replicate the organ across the image border: the border is not a surface
        ext = np.pad(ext, list(zip(clip_lo, clip_hi)), mode="edge")
    m = ext[1:-1, 1:-1, 1:-1]
    count, mean_local, cov = _moments(m.view(np.uint8))
    inner = ext[:-2, 1:-1, 1:-1] & ext[2:, 1:-1, 1:-1]
    inner &= ext[1:-1, :-2, 1:-1]
    inner &= ext[1:-1, 2:, 1:-1]
    inner &= ext[1:-1, 1:-1, :-2]
    inner &= ext[1:-1, 1:-1, 2:]
    np.greater(m, inner, out=inner)  # surface = inside and not interior
    flat = np.flatnonzero(inner)
    loc = np.unravel_index(flat, inner.shape)  # bounding-box voxel coordinates, working axes
    extremes = None
    if need_extremes:
        faces = [np.stack(loc, axis=1) + lo]
        if truncated:  # voxels on the image border can be extreme without being surface voxels
            for ax in range(3):
                for side, clip in ((0, clip_lo[ax]), (m.shape[ax] - 1, clip_hi[ax])):
                    if clip:
                        f = np.argwhere(np.take(m, side, axis=ax))
                        faces.append(np.insert(f, ax, side, axis=1) + np.asarray(lo))
        extremes = np.concatenate(faces, axis=0)
    hu = None
    if ct is not None:
        vals = ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][m]
        hu = (float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64)))
    return _OrganGeometry(label=label, count=count, centroid_vox=mean_local + lo, cov_vox=cov, bbox_lo=lo,
                          bbox_hi=(hi[0] - 1, hi[1] - 1, hi[2] - 1), truncated=truncated, surface=loc,
                          box_shape=m.shape,
                          extreme_vox=extremes, hu=hu)


def _world_points(vox: np.ndarray, a3: np.ndarray, t3: np.ndarray, shape: tuple[int, ...]
                  ) -> list[tuple[float, float, float]]:
    """World (mm, RAS+) voxel centres of ``vox`` (P, 3) as Python tuples, rounded to ``POINT_DECIMALS``.

    On a grid whose axes follow the world axes (any permutation / flip), each world coordinate depends on one
    voxel index: the Python floats of each axis are made once per grid line and shared (an object-array
    gather), which is several times faster than converting every coordinate.
    """
    if vox.shape[0] == 0:
        return []
    nz = np.abs(a3) > 0
    if np.all(nz.sum(axis=1) == 1) and np.all(nz.sum(axis=0) == 1):
        cols = []
        for r in range(3):
            c = int(np.argmax(nz[r]))
            line = np.round(np.arange(shape[c], dtype=np.float64) * a3[r, c] + t3[r], POINT_DECIMALS)
            table = np.empty(shape[c], dtype=object)
            table[:] = line.tolist()
            cols.append(table[vox[:, c]].tolist())
        return list(zip(*cols))
    f = vox.astype(np.float64)
    world = [np.round(f[:, 0] * a3[r, 0] + f[:, 1] * a3[r, 1] + f[:, 2] * a3[r, 2] + t3[r], POINT_DECIMALS)
             for r in range(3)]  # column-wise: faster than a (P, 3) @ (3, 3) product
    return list(zip(*(w.tolist() for w in world)))


def _normal_stencil(a3: np.ndarray) -> tuple[np.ndarray, float]:
    """Neighbour offsets (voxels, ``work``'s axes) of the normal estimate and the Gaussian width (mm): about one
    largest voxel size along every axis (at least the 26 neighbours; at most 5 samples per axis, so thin slices
    with fine in-plane voxels do not cost hundreds of neighbours)."""
    sp = np.linalg.norm(a3, axis=0)
    big = float(sp.max())
    axes = []
    for v in sp:
        r = max(1, int(round(big / v)))
        axes.append(np.arange(-r, r + 1) if r <= 2 else np.unique(np.rint(np.linspace(-r, r, 5)).astype(np.intp)))
    off = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return off[np.any(off != 0, axis=1)].astype(np.intp), big


def surface_normals(work: np.ndarray, vox: np.ndarray, ids: np.ndarray, a3: np.ndarray,
                    centre_vox: np.ndarray) -> np.ndarray:
    """Outward unit surface normals (world, RAS+; (P, 3) float64) at surface voxels ``vox`` (P, 3) of ``work``.

    ``ids[p]``: the value of point ``p``'s organ in ``work``; ``a3``: the affine's 3x3 part with columns in
    ``work``'s axis order; ``centre_vox``: each point's organ centroid (voxel coordinates of ``work``).
    The normal is minus the Gaussian-weighted sum (width: the largest voxel size ``h``) of the world offsets to
    those neighbours that belong to the organ, over a stencil reaching about ``h`` mm along every axis
    (:func:`_normal_stencil`: the 26 neighbours on isotropic grids); indices beyond the image are clamped to
    the edge (the border is not a surface). Where that sum vanishes (one-voxel-thin parts), the direction
    from the centroid is used instead (and the first axis if the point is the centroid). Measured on balls:
    mean error 6-12 degrees on 3 mm, 1.5 x 1.5 x 2 mm, 0.8 x 0.8 x 2.5 mm and 0.7 x 0.7 x 5 mm grids.
    """
    if len(vox) == 0:
        return np.zeros((0, 3))
    off, s = _normal_stencil(a3)
    offw = off @ a3.T  # (K, 3) world mm
    wvec = np.exp(-np.einsum("ki,ki->k", offw, offw) / (2.0 * s * s))[:, None] * offw
    dims = np.asarray(work.shape)
    flat = work.reshape(-1)
    itype: Any = np.int32 if flat.size < 2**31 else np.int64  # int32 indices: faster gathers
    strides = np.array([dims[1] * dims[2], dims[2], 1], dtype=itype)
    v = vox.astype(itype)
    o = off.astype(itype)
    idx = (v @ strides)[:, None] + (o @ strides)[None, :]  # (P, K) flat indices
    reach = np.abs(off).max(axis=0)
    edge = np.any((v < reach) | (v > dims - 1 - reach), axis=1)  # neighbours beyond the image: clamp to the edge
    if edge.any():
        idx[edge] = np.clip(v[edge][:, None, :] + o[None], 0, (dims - 1).astype(itype)) @ strides
    inside = np.take(flat, idx) == ids.astype(flat.dtype)[:, None]  # the ids are values of ``work``: they fit
    # einsum, not a BLAS product: a (P, K) x (K, 3) product is too small for threads, whose start-up and
    # spinning would cost more CPU time than the product itself
    n = -np.einsum("pk,kc->pc", inside.astype(np.float64), wvec)
    norm = np.sqrt(np.einsum("ni,ni->n", n, n))
    weak = norm < 1e-6 * s
    if weak.any():
        n[weak] = (vox[weak] - centre_vox[weak]) @ a3.T
        norm[weak] = np.linalg.norm(n[weak], axis=1)
        still = weak & (norm < 1e-9)
        n[still], norm[still] = a3[:, 0], np.linalg.norm(a3[:, 0])
    return n / norm[:, None]


@functools.lru_cache(maxsize=1)
def _unit_table() -> np.ndarray:
    table = np.empty(2 * 10**POINT_DECIMALS + 1, dtype=object)
    table[:] = np.round(np.arange(-(10**POINT_DECIMALS), 10**POINT_DECIMALS + 1) * 10.0**-POINT_DECIMALS,
                        POINT_DECIMALS).tolist()
    return table


def _unit_tuples(v: np.ndarray) -> list[tuple[float, float, float]]:
    """Rows of unit vectors ``v`` (P, 3) as Python tuples rounded to ``POINT_DECIMALS`` (shared float objects
    from one table: much faster than converting each value)."""
    idx = np.rint(v * 10**POINT_DECIMALS).astype(np.intp) + 10**POINT_DECIMALS
    table = _unit_table()
    return list(zip(*(table[idx[:, a]].tolist() for a in range(3))))


def _organs(geoms: list[_OrganGeometry], centroids: np.ndarray, covs: np.ndarray, evals: np.ndarray,
            evecs: np.ndarray, bb_lo: np.ndarray, bb_hi: np.ndarray, vox_vol: float,
            all_pts: list[tuple[float, float, float]], all_nrm: list[tuple[float, float, float]] | None,
            offsets: list[int]) -> list[Organ]:
    """The schema's organs (built without re-validation: every value was computed here, world mm RAS+)."""
    cen_l, cov_l, ev_l, vec_l = centroids.tolist(), covs.tolist(), evals.tolist(), evecs.tolist()
    lo_l, hi_l = bb_lo.tolist(), bb_hi.tolist()
    return [Organ.model_construct(
        id=g.label, name=TOTAL_CLASSES.get(g.label), voxel_count=g.count, volume_mm3=g.count * vox_vol,
        centroid_mm=tuple(cen_l[n]), covariance_mm2=tuple(map(tuple, cov_l[n])),
        eigenvalues_mm2=tuple(ev_l[n]), eigenvectors=tuple(map(tuple, vec_l[n])),
        bbox_mm=(tuple(lo_l[n]), tuple(hi_l[n])), boundary_points_mm=all_pts[offsets[n]:offsets[n + 1]],
        boundary_normals=None if all_nrm is None else all_nrm[offsets[n]:offsets[n + 1]],
        truncated=g.truncated, hu_mean=None if g.hu is None else g.hu[0],
        hu_std=None if g.hu is None else g.hu[1],
    ) for n, g in enumerate(geoms)]


def _eig_desc(covs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, >= 0) and eigenvector rows with the schema's sign convention, batched."""
    if covs.shape[0] == 0:
        return np.zeros((0, 3)), np.zeros((0, 3, 3))
    w, v = np.linalg.eigh(covs)  # ascending, columns
    w = np.clip(w[:, ::-1], 0.0, None)
    rows = np.transpose(v[:, :, ::-1], (0, 2, 1)).copy()  # (K, 3 vectors, 3 components)
    big = np.argmax(np.abs(rows), axis=2)
    sign = np.where(np.take_along_axis(rows, big[..., None], axis=2)[..., 0] < 0, -1.0, 1.0)
    rows *= sign[..., None]
    return w, rows


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _gc_paused() -> Any:
    """Pause the cyclic garbage collector while tens of thousands of point tuples are made (they hold no
    cycles; the collector's repeated passes over them would cost more than building them)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def build_passport(labels: np.ndarray, affine: np.ndarray, *, ct: np.ndarray | None = None, points: int = 500,
                   seed: int = 0, grid_kind: str = "output", source: Source | None = None,
                   model_id: str | None = None, timings: dict | None = None, normals: bool = False,
                   body: bool = False) -> Passport:
    """The passport of a label map.

    ``labels``: 3-D integer label map ``[i, j, k]`` in nibabel storage order (any memory layout);
    ``affine``: its voxel -> RAS+ world (mm) matrix (any orientation, oblique allowed); ``ct``: optional HU
    volume on the same grid (gives ``hu_mean`` / ``hu_std``); ``points``: boundary points per organ (at most;
    fewer when the organ has fewer surface voxels); ``seed``: the sampling seed (same inputs and seed give
    the same points, whatever the array's storage order); ``grid_kind``: ``output`` (the label map's own grid) or ``model`` (the 3 mm model grid).
    ``timings`` (seconds) are copied into the passport, with ``passport_build`` added. ``normals``: also store
    the outward unit normal at every boundary point (:func:`surface_normals`; 84 ms instead of 55 ms for the
    3 mm full torso's 50 000 points, and half as much JSON again; registration is more accurate with them), else ``boundary_normals`` is null.
    ``body``: also store the body outline of ``ct`` (:func:`body_outline`, with :data:`BODY_POINTS_FACTOR` times
    ``points``, the same ``seed`` and ``normals``) as ``passport.body``; without a CT a warning line says there
    is none.

    Every coordinate in the result is world mm, RAS+. Raises :class:`InputError` for a non-integer,
    negative or non-3-D label map, a bad affine or a CT of another shape. An empty label map gives a
    passport without organs, a :class:`PassportWarning` and a line in ``passport.warnings``.
    """
    t0 = time.perf_counter()
    lab = check_label_array(labels)
    try:
        aff = validate_affine(np.asarray(affine, dtype=np.float64))
    except InputError as exc:
        raise InputError(f"the label map's affine {exc.problem}", hint=exc.hint) from None
    if points < 0:
        raise InputError(f"points must be >= 0, not {points}")
    if grid_kind not in ("output", "model"):
        raise InputError(f"grid_kind must be 'output' or 'model', not {grid_kind!r}")
    if ct is not None:
        ct = np.asanyarray(ct)
        if ct.shape != lab.shape:
            raise InputError(f"the CT has shape {ct.shape} but the label map {lab.shape}: not on the same grid")
        if not (np.issubdtype(ct.dtype, np.number) and ct.dtype.kind != "c"):
            raise InputError(f"the CT has {ct.dtype} voxels, expected numbers (HU)")
    orig_shape = lab.shape

    # Work on a C-contiguous view: find_objects and the crops are much faster that way.
    if lab.flags.c_contiguous:
        work, axes = lab, (0, 1, 2)
    elif lab.flags.f_contiguous:
        work, axes = lab.T, (2, 1, 0)
    else:
        work, axes = np.ascontiguousarray(lab), (0, 1, 2)
    inv_axes = tuple(int(a) for a in np.argsort(axes))  # working axis -> original axis is axes[...]
    a3 = aff[:3, :3][:, list(axes)]  # affine columns in working axis order
    t3 = aff[:3, 3]
    ct_w = None if ct is None else (ct.T if axes == (2, 1, 0) else ct)
    spacing_o = tuple(float(v) for v in spacing_from_affine(aff))  # mm per original axis
    oblique = bool(np.count_nonzero(np.abs(a3) > 1e-12 * np.abs(a3).max()) > 3)

    # Label ids: find_objects directly for ordinary ids, renumbering for huge ones (rare).
    small = work.dtype.itemsize <= 2  # uint8/int8/uint16/int16: every id < 65536
    max_id = 0 if small else int(work.max())
    id_of = None
    if max_id >= MAX_DIRECT_LABEL:
        uniq, inverse = np.unique(work, return_inverse=True)
        shift = 0 if uniq[0] == 0 else 1  # renumbered id r stands for id_of[r]; 0 stays background
        work = (inverse.reshape(work.shape) + shift).astype(np.int64)
        id_of = uniq if shift == 0 else np.concatenate([[0], uniq])
    if not work.dtype.isnative or (work.dtype.kind == "u" and work.dtype.itemsize == 8):
        work = work.astype(np.int64 if work.dtype.itemsize == 8 else work.dtype.newbyteorder("="))
    objs = ndimage.find_objects(work)

    geoms: list[_OrganGeometry] = []
    work_ids: list[int] = []  # each organ's value in ``work`` (its label id unless renumbered)
    for idx, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        g = _organ_geometry(work, idx, sl, ct_w, oblique)
        if id_of is not None:
            g.label = int(id_of[idx])
        geoms.append(g)
        work_ids.append(idx)

    k = len(geoms)
    covs_w = a3 @ np.array([g.cov_vox for g in geoms]).reshape(k, 3, 3) @ a3.T
    covs_w = 0.5 * (covs_w + np.transpose(covs_w, (0, 2, 1)))
    evals, evecs = _eig_desc(covs_w)
    vox_vol = abs(float(np.linalg.det(aff[:3, :3])))
    centroids = np.array([g.centroid_vox for g in geoms]).reshape(k, 3) @ a3.T + t3
    corners = np.array([[g.bbox_lo, g.bbox_hi] for g in geoms], dtype=np.float64).reshape(k, 2, 3) @ a3.T + t3
    bb_lo, bb_hi = corners.min(axis=1), corners.max(axis=1)
    for n, g in enumerate(geoms):
        if g.extreme_vox is not None:  # oblique grid: the world box of the extreme voxels, exactly
            world = g.extreme_vox @ a3.T + t3
            bb_lo[n], bb_hi[n] = world.min(axis=0), world.max(axis=0)
    all_vox = np.zeros((0, 3), dtype=np.intp)
    counts = np.zeros(k, dtype=np.int64)
    if k and points > 0:  # boundary points: one stratified sampling pass for all organs
        n_surf = [len(g.surface[0]) for g in geoms]
        cat = [np.concatenate([g.surface[a] for g in geoms]) for a in range(3)]  # working axes, box coords
        coords_c, spacing_c, extents_c = _canonical_boxes([cat[a] for a in inv_axes], spacing_o, aff,
                                                          [[g.box_shape[a] for a in inv_axes] for g in geoms],
                                                          n_surf)
        rows, counts = sample_surfaces(coords_c, n_surf, spacing_c, points,
                                       [_seed_key(seed, g.label) for g in geoms], extents_c)
        all_vox = np.stack([cat[a][rows] + np.repeat([g.bbox_lo[a] for g in geoms], counts) for a in range(3)],
                           axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    nrm = None
    if normals:
        centre_vox = np.array([g.centroid_vox for g in geoms]).reshape(k, 3)
        nrm = surface_normals(work, all_vox, np.repeat(np.asarray(work_ids, dtype=np.int64), counts), a3,
                              np.repeat(centre_vox, counts, axis=0))
    with _gc_paused():
        all_pts = _world_points(all_vox, a3, t3, work.shape)
        all_nrm = None if nrm is None else _unit_tuples(nrm)
        organs = _organs(geoms, centroids, covs_w, evals, evecs, bb_lo, bb_hi, vox_vol, all_pts, all_nrm,
                         offsets)

    notes: list[str] = []
    bad_hu = [o.id for o in organs if o.hu_mean is not None and o.hu_std is not None
              and not (np.isfinite(o.hu_mean) and np.isfinite(o.hu_std))]
    for o in organs:
        if o.id in bad_hu:
            o.hu_mean = o.hu_std = None
    if bad_hu:
        notes.append(f"the CT has NaN or infinite values inside label(s) {bad_hu}: their HU statistics are null")
    if not organs:
        notes.append("the label map is empty (no label > 0): the passport has no organs")
        warnings.warn(notes[-1], PassportWarning, stacklevel=2)
    body_organ = None
    if body and any(o.id == BODY_ID for o in organs):
        notes.append(f"label {BODY_ID} is the body outline's id: the passport has no body outline")
    elif body and ct is not None:
        t1 = time.perf_counter()
        body_organ = body_outline(ct, aff, points=BODY_POINTS_FACTOR * points, seed=seed, normals=normals)
        if body_organ is None:
            notes.append(f"no body in the CT (nothing above {BODY_HU:g} HU thicker than two voxels): "
                         "the passport has no body outline")
        body_s = time.perf_counter() - t1
    elif body:
        notes.append("no CT was given: the passport has no body outline")
    build_s = time.perf_counter() - t0
    tm = {str(k): float(v) for k, v in (timings or {}).items()}
    tm["passport_build"] = build_s
    if body_organ is not None:
        tm["passport_body"] = body_s
    grid = Grid(kind=grid_kind, shape=orig_shape, spacing_mm=tuple(spacing_from_affine(aff).tolist()),  # type: ignore[arg-type]
                affine=tuple(tuple(r) for r in aff.tolist()), orientation=axcodes(aff))
    return Passport.model_construct(source=source or Source(), grid=grid, model_id=model_id, seed=int(seed),
                                    points_per_organ=int(points), timings=tm, organs=organs, body=body_organ,
                                    warnings=notes)


#: Body outline: CT above this (HU) is body (fat is about -100, lung -850, air -1000).
BODY_HU = -300.0
#: CT values below this (HU) are the scanner's padding outside the reconstructed field of view (DICOM pixel
#: padding, typically -2000 to -3024), not air (-1000): the body's edge there is the field of view's, not skin.
PADDING_HU = -1500.0
#: The body outline is computed on the CT's grid taken every s-th voxel, s * spacing <= this (mm).
BODY_GRID_MM = 3.0
#: The body outline's surface is the largest of a passport's: it takes this many times ``points`` (measured on
#: the registration validation: 1x, 2x and 4x gave 2.97, 2.89 and 2.91 mm mean TRE at 10 mm on the shared CT).
BODY_POINTS_FACTOR = 2


def body_grid(ct: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CT (HU, ``ct[i, j, k]`` in nibabel order) taken every ``s``-th voxel along each axis (``s`` the largest
    integer with ``s * spacing <= BODY_GRID_MM``, at least 1) and that grid's voxel -> RAS+ (mm) affine.

    The kept voxels are counted from the R, A and S ends of the axes they are closest to (the first voxel
    of a RAS+ copy of the image), so the same CT stored in another voxel order keeps the same world voxels."""
    import nibabel as nib

    aff = np.asarray(affine, dtype=np.float64)
    spacing = spacing_from_affine(aff)
    step = [max(1, int(BODY_GRID_MM // float(v) + 1e-9)) for v in spacing]
    arr = np.asanyarray(ct)
    flipped = nib.orientations.io_orientation(aff)[:, 1] < 0  # axis a runs toward L, P or I
    start = [(n - 1) % s if f else 0 for n, s, f in zip(arr.shape, step, flipped)]
    sub = arr[start[0]::step[0], start[1]::step[1], start[2]::step[2]]
    out = aff.copy()
    out[:3, :3] = aff[:3, :3] * np.asarray(step, dtype=np.float64)[None, :]
    out[:3, 3] = aff[:3, :3] @ np.asarray(start, dtype=np.float64) + aff[:3, 3]
    return sub, out


def _in_slice(axis: int) -> np.ndarray:
    """The 3x3x3 structuring element of 4-connectivity within a slice across ``axis`` (none across slices)."""
    plane = np.zeros((3, 3, 3), dtype=bool)
    index: list[Any] = [slice(None)] * 3
    index[axis] = 1
    plane[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return plane


def _slice_holes(solid: np.ndarray, axis: int) -> np.ndarray:
    """Background voxels of ``solid`` enclosed within their slice across ``axis`` (4-connected background that
    does not reach the slice's edge): what a per-slice hole filling adds. One labelling pass for all slices."""
    lab, n = ndimage.label(~solid, structure=_in_slice(axis))
    outside = np.zeros(n + 1, dtype=bool)
    outside[0] = True  # the solid itself
    for ax in range(3):
        if ax != axis:  # the slice's edges: the first and last layer along the two in-slice axes
            outside[np.take(lab, [0, lab.shape[ax] - 1], axis=ax)] = True
    return ~outside[lab]


def body_mask(ct: np.ndarray, affine: np.ndarray, hu: float = BODY_HU) -> np.ndarray:
    """The patient's body in a CT (``ct[i, j, k]`` in HU, nibabel order; ``affine`` voxel -> RAS+ mm).

    Voxels above ``hu`` HU; the largest 26-connected part after a 3x3x3 opening (which cuts thin contacts
    such as the table's rim; the body's own voxels within one voxel of that part are kept); then the holes of
    each slice across the axis nearest to world S-I are filled (lungs, airways, bowel gas). The scanner's
    padding outside the reconstructed field of view (below :data:`PADDING_HU`) may hide more body: a hole
    that reaches it is filled when the padding borders less of it than the body does (a lung cut by the field
    of view), not otherwise (the air between the body and a circular field of view). Boolean, on ``ct``'s
    grid; the padding is never part of it.
    """
    arr = np.asarray(ct)
    tissue = arr > hu
    if not tissue.any():
        return tissue
    # the opening and the dilation as 3x3x3 minimum/maximum filters (separable: twice as fast as the binary ones)
    opened = ndimage.maximum_filter(ndimage.minimum_filter(tissue.view(np.uint8), size=3, mode="constant"),
                                    size=3, mode="constant")
    lab, n = ndimage.label(opened, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(tissue)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    largest = (lab == int(np.argmax(sizes))).view(np.uint8)
    mask = tissue & ndimage.maximum_filter(largest, size=3, mode="constant").view(bool)
    axis = int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[2, :3])))  # the voxel axis nearest to S-I
    unseen = arr < PADDING_HU
    if not unseen.any():
        return mask | _slice_holes(mask, axis)
    holes = _slice_holes(mask | unseen, axis)
    plane = _in_slice(axis)
    hole_lab, n_holes = ndimage.label(holes, structure=plane)
    if n_holes:
        def bordered_by(region: np.ndarray) -> np.ndarray:  # per hole: its voxels next to ``region``
            near = ndimage.binary_dilation(region, structure=plane) & holes
            return np.bincount(hole_lab[near], minlength=n_holes + 1)

        by_pad, by_body = bordered_by(unseen), bordered_by(mask)
        inside = by_pad <= by_body
        inside[0] = False
        mask |= inside[hole_lab]
    return mask


def body_outline(ct: np.ndarray, affine: np.ndarray, *, points: int = 500, seed: int = 0,
                 normals: bool = False) -> Organ | None:
    """The body outline of a CT as a passport organ record (id ``BODY_ID``, name ``body``; see
    :mod:`.schema`): :func:`body_mask` on :func:`body_grid`, its geometry, up to ``points`` skin-surface points
    (world mm, RAS+; none on the image border) and, with ``normals``, their outward normals. None when the mask
    is empty (nothing above ``BODY_HU``, or nothing thicker than two voxels of the strided grid)."""
    sub, sub_aff = body_grid(ct, affine)
    mask = body_mask(sub, sub_aff)
    if not mask.any():
        return None
    p = build_passport(mask.astype(np.uint8), sub_aff, points=points, seed=seed, normals=True)
    organ = p.organs[0]
    pts, nrm = organ.points_array(), organ.normals_array()
    unseen = np.asarray(sub) < PADDING_HU  # outside the reconstructed field of view: not air, not a surface
    if len(pts) and unseen.any():
        near = ndimage.binary_dilation(unseen, structure=np.ones((3, 3, 3), dtype=bool))
        inv = np.linalg.inv(sub_aff)
        vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.intp)
        keep = ~near[tuple(np.clip(vox, 0, np.asarray(near.shape) - 1).T)]
        pts, nrm = pts[keep], None if nrm is None else nrm[keep]
    return organ.model_copy(update={
        "id": BODY_ID, "name": BODY_NAME,
        "boundary_points_mm": [tuple(r) for r in pts.tolist()],
        "boundary_normals": None if not normals or nrm is None else [tuple(r) for r in nrm.tolist()]})


def passport_from_file(seg_path: str | Path, *, ct_path: str | Path | None = None, points: int = 500,
                       seed: int = 0, normals: bool = False, body: bool = False,
                       series_uid: str | None = None) -> Passport:
    """The passport of a label map file (NIfTI, or a DICOM SEG with its CT), with the SHA-256 of the files it was
    made from.

    ``seg_path``: an integer, non-negative 3-D label map (TotalSegmentator's or ctpassport's output, any
    orientation), or a DICOM SEG whose segment labels are TotalSegmentator class names (``segment
    --output-type dicom_seg``'s); a SEG needs ``ct_path``, the DICOM series it was made from, whose grid the
    passport then takes (:func:`ctpassport.io.dicom_seg.dicom_seg_labels`); ``ct_path``: optional CT (HU)
    on the same grid, for ``hu_mean`` / ``hu_std``: a NIfTI file, a DICOM folder or a zip of one (the largest
    CT series, or ``series_uid``; its hash as :func:`ctpassport.io.load.source_sha256`), in any voxel order. The
    passport's grid is the label map's own (``kind="output"``); coordinates are world mm, RAS+. ``normals``:
    store the boundary points' outward normals, ``body``: the CT's body outline (see :func:`build_passport`).
    Raises :class:`InputError` (one line naming the file) for unreadable, non-integer, negative, 4-D
    label maps and for a CT on another grid.
    """
    from ..io.load import load_ct, source_sha256

    from ..io.dicom_seg import dicom_seg_labels, is_dicom_seg

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ct: np.ndarray | None
    if is_dicom_seg(seg_path):  # a SEG holds only its segments' frames: the CT gives the grid
        if ct_path is None:
            raise InputError("is a DICOM SEG, which holds only the frames with segments", seg_path,
                             "give --ct, the DICOM series it was made from, to place it on that grid")
        ct_img = load_ct(ct_path, series_uid)
        labels = dicom_seg_labels(seg_path, ct_img)
        affine = np.asarray(ct_img.affine, dtype=np.float64)
        ct = np.asarray(ct_img.data)
    else:
        labels, affine, ct = _label_file_and_ct(seg_path, ct_path, series_uid)
    timings["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    source = Source(path=str(Path(seg_path)), sha256=_sha256(Path(seg_path)),
                    ct_path=str(Path(ct_path)) if ct_path is not None else None,
                    ct_sha256=source_sha256(ct_path, series_uid) if ct_path is not None else None)
    timings["hash"] = time.perf_counter() - t1
    return build_passport(labels, affine, ct=ct, points=points, seed=seed, grid_kind="output", source=source,
                          timings=timings, normals=normals, body=body)


def _label_file_and_ct(seg_path: str | Path, ct_path: str | Path | None,
                       series_uid: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A NIfTI label map (checked), its voxel -> RAS+ affine, and the CT at ``ct_path`` (any format) brought onto
    its grid (None without ``ct_path``); see :func:`passport_from_file`."""
    from ..io.load import load_ct

    seg = read_image(seg_path, kind="label map")
    raw_dtype = np.dtype(seg.header.get_data_dtype())
    if not (np.issubdtype(seg.data.dtype, np.integer) or seg.data.dtype == np.bool_):
        what = (f"{raw_dtype} voxels with an intensity scaling (scl_slope/scl_inter)"
                if np.issubdtype(raw_dtype, np.integer) else f"{raw_dtype} voxels")
        raise InputError(f"has {what}: not a label map of integer ids", seg_path,
                         "save it with an integer data type (e.g. uint8, uint16) and no scaling")
    labels = check_label_array(seg.data, seg_path)
    ct = None
    if ct_path is not None:
        ct_img = load_ct(ct_path, series_uid)
        ct = onto_grid(ct_img.data, ct_img.affine, seg.shape, seg.affine)  # stored in another order: reordered
        if ct is None:
            raise InputError(f"is not on the label map's grid (shape {ct_img.shape}, {''.join(axcodes(ct_img.affine))}, "
                             f"vs {seg.shape}, {''.join(axcodes(seg.affine))}, or another origin or spacing)", ct_path,
                             "pass the CT the label map was made from")
    return labels, np.asarray(seg.affine, dtype=np.float64), ct


def passport_from_segmentation(result: Any, out_path: str | Path, *, input_path: str | Path,
                               grid: str = "model", model_id: str | None = None,
                               timings: dict[str, float] | None = None, ct: np.ndarray | None = None,
                               points: int = 500, seed: int = 0, normals: bool = False, body: bool = False,
                               series_uid: str | None = None) -> Passport:
    """Build the passport of a segmentation run and write it atomically to ``out_path`` (JSON).

    ``result``: a :class:`~ctpassport.segment.pipeline.SegmentationResult`. ``grid="model"`` takes the
    passport on the 3 mm canonical (RAS+) grid the network ran on (``result.model_labels`` with
    ``result.model_ct`` for HU, as the original study did); ``grid="output"`` on the input's own grid
    (``result.labels``, HU from ``ct`` (the input CT's voxels) when given, else read again from
    ``input_path``: NIfTI, DICOM folder or zip). ``timings``: the pipeline's seconds per stage so far.
    ``normals``: store the boundary points' outward normals, ``body``: the CT's body outline (see
    :func:`build_passport`). ``series_uid``: the
    DICOM series that was segmented (default: the largest CT series, as :func:`ctpassport.io.load.load_ct`).
    The passport records the grid kind, the model id and the input's path and SHA-256 (for DICOM: the
    series' identity hash of :func:`ctpassport.io.load.source_sha256`). Coordinates are world mm, RAS+.
    """
    if grid not in ("model", "output"):
        raise InputError(f"--passport-grid must be 'model' or 'output', not {grid!r}")
    from ..io.load import load_ct, source_sha256

    inp = Path(input_path)
    t0 = time.perf_counter()
    source = Source(path=str(inp), sha256=source_sha256(inp, series_uid))
    timings = {**(timings or {}), "passport_hash": time.perf_counter() - t0}
    if grid == "model":
        labels, affine, hu = result.model_labels, result.model_affine, result.model_ct
    else:
        labels, affine, hu = result.labels, result.affine, ct
        if hu is None:  # the input CT, read again (NIfTI file, DICOM folder or zip)
            t0 = time.perf_counter()
            hu = load_ct(inp, series_uid).data
            timings["passport_read_ct"] = time.perf_counter() - t0
    note = None
    if hu is not None and hu.shape != labels.shape:
        note = f"the CT has shape {hu.shape}, the labels {labels.shape}: no HU statistics"
        hu = None
    elif hu is None:
        note = "no CT on the passport's grid was available: no HU statistics"
    passport = build_passport(labels, affine, ct=hu, points=points, seed=seed, grid_kind=grid, source=source,
                              model_id=model_id, timings=timings, normals=normals, body=body)
    if note:
        passport.warnings.append(note)
    save_passport(passport, out_path)
    return passport
