"""Registration from passports (issue 4): rigid and deformable tiers, ITK/NIfTI transforms, warping, validation.

Convention: a transform maps a **fixed**-space point to the corresponding **moving**-space point (pull-back),
world mm RAS+: ``T(x) = R (x + u(x)) + t``. See :mod:`ctpassport.register.api` and ``README.md`` here.
"""

from __future__ import annotations

from .api import CONVENTION, RegistrationResult, load_transform, register_passports, register_points
from .rigid import STABILITY_WEIGHTS, stability_weight
from .transform import DisplacementField, GridSpec, RigidTransform, Transform

__all__ = [
    "CONVENTION",
    "STABILITY_WEIGHTS",
    "DisplacementField",
    "GridSpec",
    "RegistrationResult",
    "RigidTransform",
    "Transform",
    "load_transform",
    "register_passports",
    "register_points",
    "stability_weight",
]
