"""Named array aliases used across ctpassport.

Conventions (every public function restates the ones it uses):

* World coordinates are millimetres in **RAS+** unless a name says ``lps``: +x points to the patient's
  Right, +y Anterior, +z Superior (nibabel / NIfTI convention). LPS+ (DICOM, ITK) has +x Left,
  +y Posterior, +z Superior; a point converts between the two by negating x and y.
* Voxel arrays are indexed ``[i, j, k]`` in the order nibabel returns them (the file's storage order);
  ``Affine @ [i, j, k, 1]`` gives the RAS+ world position of the voxel centre.
* nnU-Net's axis order is the reverse of nibabel's for SimpleITK-read plans (``[k, j, i]``); code that
  talks to the network says so explicitly.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

Affine: TypeAlias = npt.NDArray[np.float64]
"""4x4 voxel-index -> RAS+ world (mm) matrix."""

Spacing: TypeAlias = tuple[float, float, float]
"""Voxel size in mm along the three array axes, in array axis order."""

Shape3D: TypeAlias = tuple[int, int, int]
"""Array shape of a 3-D volume, in array axis order."""

Volume: TypeAlias = npt.NDArray[np.floating]
"""A 3-D intensity volume in array axis order ``[i, j, k]`` (CT in Hounsfield units unless stated)."""

LabelMap: TypeAlias = npt.NDArray[np.integer]
"""A 3-D integer label map in array axis order ``[i, j, k]``: 0 background, k > 0 the class id
(TotalSegmentator ids for class k)."""

Points: TypeAlias = npt.NDArray[np.float64]
"""An (N, 3) array of world coordinates in mm (RAS+ unless stated)."""

Logits: TypeAlias = npt.NDArray[np.floating]
"""Network output (C, d0, d1, d2): channels first, spatial axes in nnU-Net order; C = number of classes
including background (channel k is class k)."""
