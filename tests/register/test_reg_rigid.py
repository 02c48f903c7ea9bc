"""Tier 1: weighted, robust Kabsch on centroids and principal axes."""

from __future__ import annotations

import numpy as np
import pytest
from register_helpers import make_organ, make_passport

from ctpassport.errors import ConfigError, RegistrationError
from ctpassport.model.classes import NAME_TO_ID
from ctpassport.register.rigid import (
    STABILITY_WEIGHTS,
    check_weights,
    fit_rigid_passports,
    fit_rigid_points,
    line_spread_mm,
    stability_weight,
    weighted_kabsch,
)
from ctpassport.register.transform import RigidTransform

NAMES = [
    "vertebrae_L1",
    "vertebrae_L3",
    "sacrum",
    "liver",
    "spleen",
    "kidney_left",
    "rib_left_8",
    "lung_upper_lobe_left",
]


def _organs(
    rng: np.random.Generator, names=NAMES, spherical: bool = False
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for n in names:
        c = rng.uniform(-100, 100, 3)
        if spherical:
            cov = np.eye(3) * 50.0
        else:
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            cov = q @ np.diag(rng.uniform([200, 60, 10], [600, 150, 40])) @ q.T
        out.append((NAME_TO_ID[n], c, cov))
    return out


def _moved(organs, rigid: RigidTransform, truncated: set[int] = frozenset()):
    fixed = [make_organ(i, c, cov, truncated=i in truncated) for i, c, cov in organs]
    moving = [
        make_organ(i, rigid.apply(c)[0], rigid.rotation @ cov @ rigid.rotation.T) for i, c, cov in organs
    ]
    return make_passport(fixed), make_passport(moving)


def test_stability_table() -> None:
    assert stability_weight("vertebrae_T7") == 1.0
    assert stability_weight("sacrum") == 1.0 and stability_weight("hip_left") == 1.0
    assert stability_weight("rib_right_3") == 0.9
    assert stability_weight("liver") == 0.6 and stability_weight("kidney_left") == 0.6
    assert stability_weight("lung_middle_lobe_right") == 0.4
    assert stability_weight(None) == stability_weight("not_a_class") == 0.5
    assert stability_weight("liver", {"liver": 0.1}) == 0.1
    assert len({p for p, _ in STABILITY_WEIGHTS}) == len(STABILITY_WEIGHTS)  # one table, no duplicates
    assert check_weights({"liver": 0, "lung_*": 1e6}) == {"liver": 0, "lung_*": 1e6}
    for bad in (float("nan"), float("inf"), -0.1, 1e7, "1"):
        with pytest.raises(ConfigError, match="stability weight 'liver'"):
            check_weights({"liver": bad})  # type: ignore[dict-item]


def test_weighted_kabsch_exact_and_reflection_safe() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(10, 3)) * 40
    r = RigidTransform.from_euler((20, -35, 50), (5, -7, 11))
    est = weighted_kabsch(src, r.apply(src), rng.uniform(0.2, 1.0, 10))
    np.testing.assert_allclose(est.matrix, r.matrix, atol=1e-10)
    mirrored = src * [-1, 1, 1]
    assert np.linalg.det(weighted_kabsch(src, mirrored).rotation) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_rotation_and_translation_recovered_to_1e6(seed: int) -> None:
    """Exact passports of a rigidly moved body: the fit (centroids + axes, with eigenvector sign flips in the
    moving passport) recovers the rotation and translation to 1e-6."""
    rng = np.random.default_rng(seed)
    truth = RigidTransform.from_euler(rng.uniform(-25, 25, 3), rng.uniform(-40, 40, 3))
    fp, mp = _moved(_organs(rng), truth)
    fit = fit_rigid_passports(fp, mp)
    np.testing.assert_allclose(fit.transform.rotation, truth.rotation, atol=1e-6)
    np.testing.assert_allclose(fit.transform.translation, truth.translation, atol=1e-6)
    assert fit.rms_mm < 1e-6
    assert all(o.status == "used" and o.residual_mm < 1e-6 for o in fit.organs)


def test_axes_resolve_rotation_about_the_spine_line() -> None:
    """Three collinear centroids fix no rotation about their line; elongated organs' axes do."""
    rng = np.random.default_rng(4)
    organs = []
    for k, n in enumerate(["vertebrae_L1", "vertebrae_L2", "vertebrae_L3"]):
        c = np.array([0.0, 0.0, 40.0 * k])
        cov = np.diag([400.0, 80.0, 20.0])  # wide left-right, short anterior-posterior
        organs.append((NAME_TO_ID[n], c, cov))
    truth = RigidTransform.from_euler((0, 0, 17), (3, 4, 5))
    fp, mp = _moved(organs, truth)
    fit = fit_rigid_passports(fp, mp)
    np.testing.assert_allclose(fit.transform.matrix, truth.matrix, atol=1e-6)
    assert all(o.axis_weights[0] > 0 for o in fit.organs)
    del rng


def test_collinear_spherical_organs_are_an_error() -> None:
    organs = [
        (NAME_TO_ID[n], np.array([0.0, 0.0, 30.0 * k]), np.eye(3) * 50)
        for k, n in enumerate(["vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4"])
    ]
    fp, mp = _moved(organs, RigidTransform.from_euler((0, 0, 10), (1, 2, 3)))
    with pytest.raises(RegistrationError, match="collinear"):
        fit_rigid_passports(fp, mp)


def test_fewer_than_three_usable_organs_is_an_error() -> None:
    rng = np.random.default_rng(5)
    organs = _organs(rng, NAMES[:4])
    fp, mp = _moved(organs, RigidTransform.identity(), truncated={organs[0][0], organs[1][0]})
    with pytest.raises(RegistrationError, match="only 2 usable organ"):
        fit_rigid_passports(fp, mp)
    # the deformable tier's fallback may use cut organs (down-weighted)
    fit = fit_rigid_passports(fp, mp, allow_truncated=True)
    np.testing.assert_allclose(fit.transform.matrix, np.eye(4), atol=1e-6)


def test_truncated_missing_and_excluded_organs_are_left_out_and_reported() -> None:
    rng = np.random.default_rng(6)
    organs = _organs(rng)
    truth = RigidTransform.from_euler((5, 5, 5), (10, 0, 0))
    fixed = [make_organ(i, c, cov, truncated=(k == 0)) for k, (i, c, cov) in enumerate(organs)]
    moving = [
        make_organ(i, truth.apply(c)[0], truth.rotation @ cov @ truth.rotation.T)
        for k, (i, c, cov) in enumerate(organs)
        if k != 1
    ]
    fit = fit_rigid_passports(make_passport(fixed), make_passport(moving), exclude=[NAMES[2]])
    status = {o.name: o.status for o in fit.organs}
    assert status[NAMES[0]] == "truncated"
    assert status[NAMES[1]] == "missing_moving"
    assert status[NAMES[2]] == "excluded"
    np.testing.assert_allclose(fit.transform.matrix, truth.matrix, atol=1e-6)


def test_an_organ_that_disagrees_is_dropped_and_reported() -> None:
    rng = np.random.default_rng(7)
    organs = _organs(rng)
    truth = RigidTransform.from_euler((3, -6, 8), (12, -4, 2))
    fp, mp = _moved(organs, truth)
    bad = mp.organs[3].model_copy(
        update={"centroid_mm": tuple(np.add(mp.organs[3].centroid_mm, [25.0, 0, 0]))}
    )
    mp = mp.model_copy(update={"organs": [bad if o.id == bad.id else o for o in mp.organs]})
    # small, realistic noise on the others
    noisy = [
        o.model_copy(update={"centroid_mm": tuple(np.add(o.centroid_mm, rng.normal(0, 0.5, 3)))})
        if o.id != bad.id
        else o
        for o in mp.organs
    ]
    mp = mp.model_copy(update={"organs": noisy})
    fit = fit_rigid_passports(fp, mp)
    by = {o.name: o for o in fit.organs}
    assert by[bad.name].status == "dropped"
    assert by[bad.name].residual_mm > 20
    assert np.linalg.norm(fit.transform.translation - truth.translation) < 3.0
    assert fit.transform.inverse().compose(truth).angle_deg < 1.5


def test_fit_rigid_points_robust() -> None:
    rng = np.random.default_rng(8)
    f = rng.uniform(-100, 100, size=(30, 3))
    truth = RigidTransform.from_euler((10, 20, -15), (5, 6, 7))
    m = truth.apply(f)
    np.testing.assert_allclose(fit_rigid_points(f, m).transform.matrix, truth.matrix, atol=1e-9)
    m[4] += [40, -30, 10]
    fit = fit_rigid_points(f, m)
    assert fit.organs[4].status == "dropped"
    np.testing.assert_allclose(fit.transform.matrix, truth.matrix, atol=1e-6)
    with pytest.raises(RegistrationError, match="at least 3"):
        fit_rigid_points(f[:2], m[:2])
    with pytest.raises(RegistrationError, match="differ in length"):
        fit_rigid_points(f, m[:10])
    line = np.c_[np.arange(5.0) * 10, np.zeros(5), np.zeros(5)]
    with pytest.raises(RegistrationError, match="collinear"):
        fit_rigid_points(line, line)
    assert line_spread_mm(line) < 1e-9
