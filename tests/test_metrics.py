"""Metrics against known answers (Learn2Reg definitions, DESIGN.md §5)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from rwcflow import metrics, spatial


def box(shape, lo, hi, label=1) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return labels


def three_labels() -> np.ndarray:
    labels = box((12, 12, 12), (1, 1, 1), (6, 6, 6), 1)
    labels[6:11, 2:9, 3:10] = 2
    labels[2:5, 7:11, 7:11] = 5
    return labels


def test_identical_label_maps_score_dice_1_and_hd95_0():
    labels = three_labels()
    assert metrics.dice(labels, labels) == {1: 1.0, 2: 1.0, 5: 1.0}  # background 0 excluded
    assert metrics.hd95(labels, labels, spacing=(1.0, 2.0, 0.5)) == {1: 0.0, 2: 0.0, 5: 0.0}
    assert metrics.mean_score(metrics.dice(labels, labels)) == 1.0


def test_dice_of_disjoint_and_shifted_cubes():
    fixed = box((10, 10, 10), (1, 1, 1), (5, 5, 5))
    assert metrics.dice(fixed, box((10, 10, 10), (5, 5, 5), (9, 9, 9))) == {1: 0.0}
    # shifted by one voxel: 48 of 64 voxels overlap -> 2 * 48 / 128
    assert metrics.dice(fixed, np.roll(fixed, 1, axis=0)) == {1: 0.75}


def test_labels_missing_from_one_image_are_not_scored():
    fixed = three_labels()
    warped = np.where(fixed == 5, 0, fixed)
    warped[warped == 2] = 0
    warped[6:11, 3:9, 3:10] = 2  # label 2 loses one of 7 rows: Dice 2*30/(35+30) per slice
    scores = metrics.dice(fixed, warped)
    assert set(scores) == {1, 2}
    assert scores[2] == pytest.approx(60 / 65)
    assert metrics.mean_score(scores) == pytest.approx((1.0 + 60 / 65) / 2)
    assert set(metrics.hd95(fixed, warped, (1, 1, 1))) == {1, 2}
    assert set(metrics.dice(fixed, warped, labels=[2, 5, 7])) == {2}
    # Learn2Reg checks presence in the moving image: a label lost by the warp scores 0 / inf
    lost = metrics.dice(fixed, warped, moving_labels=fixed)
    assert lost[5] == 0.0 and metrics.hd95(fixed, warped, (1, 1, 1), moving_labels=fixed)[5] == math.inf
    assert math.isnan(metrics.mean_score({}))


def test_hd95_of_a_sheet_shifted_by_k_voxels_is_k_times_the_spacing():
    # every voxel of a one-voxel-thick sheet is on its surface, and its nearest voxel of the shifted
    # sheet is k voxels away along axis 1: all surface distances, hence HD95, are k * s1
    fixed = box((10, 12, 10), (2, 3, 2), (8, 4, 8))
    warped = np.roll(fixed, 3, axis=1)
    assert metrics.hd95(fixed, warped, spacing=(1.0, 1.5, 0.7)) == {1: pytest.approx(4.5)}


def test_hd95_of_a_cube_shifted_by_k_voxels_is_k_times_the_spacing():
    # No surface voxel is further than k * s2 from the other surface (the other cube's face across the
    # shift spans the whole cross-section), and the 7 x 7 face left behind, 49 of the 218 surface voxels
    # (over 5 %), is exactly that far: the 95th percentile and the maximum are both k * s2.
    fixed = box((16, 16, 16), (3, 3, 3), (10, 10, 10))
    warped = np.roll(fixed, 2, axis=2)
    spacing = (0.8, 1.0, 2.5)
    assert metrics.hd95(fixed, warped, spacing) == {1: pytest.approx(5.0)}
    assert metrics.hd95(fixed, warped, spacing, percentile=100) == {1: pytest.approx(5.0)}


def brute_force_hd(fixed: np.ndarray, warped: np.ndarray, spacing, percentile: float) -> float:
    """Independent HD: surface voxels by neighbour comparison, all pairwise distances, sorted percentiles."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    def directed(a, b):
        nearest = np.sort(cdist(a, b).min(axis=1))
        return nearest[math.ceil(percentile / 100 * len(nearest)) - 1]

    a, b = surface_points(fixed), surface_points(warped)
    return max(directed(a, b), directed(b, a))


def test_hd95_matches_a_brute_force_computation_on_irregular_shapes():
    x = spatial.identity_grid((14, 16, 12))[0].numpy()
    ball = ((x[0] - 6) ** 2 + (x[1] - 7) ** 2 + (x[2] - 5) ** 2) <= 20
    fixed = (ball | (x[0] < 2)).astype(np.int32)  # touches the array border
    warped = ((x[0] - 7.5) ** 2 / 1.5 + (x[1] - 8) ** 2 + (x[2] - 6) ** 2 <= 24).astype(np.int32)
    spacing = (1.2, 0.9, 2.0)
    for percentile in (95.0, 100.0):
        expected = brute_force_hd(fixed.astype(bool), warped.astype(bool), spacing, percentile)
        assert metrics.hd95(fixed, warped, spacing, percentile=percentile)[1] == pytest.approx(expected)


def test_affine_fields_have_a_constant_jacobian():
    rotation = torch.eye(4, dtype=torch.float64)
    cos, sin = math.cos(0.3), math.sin(0.3)
    rotation[:2, :2] = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    scaling = torch.diag(torch.tensor([1.2, 0.9, 1.1, 1.0], dtype=torch.float64))
    scaling[:3, 3] = torch.tensor([2.0, -1.0, 0.5])
    for matrix, det in ((rotation, 1.0), (scaling, 1.2 * 0.9 * 1.1)):
        field = spatial.affine_field(matrix, (10, 11, 12))
        np.testing.assert_allclose(metrics._jacobian(field), det, rtol=1e-12)
        assert metrics.sdlogj(field) == pytest.approx(0.0, abs=1e-12)
        assert metrics.std_log_jacobian(field) == pytest.approx(0.0, abs=1e-12)
        assert metrics.folding_percent(field) == 0.0
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert metrics.folding_percent(spatial.affine_field(mirror, (6, 6, 6))) == 100.0


def test_sdlogj_folding_and_std_log_jacobian_of_a_field_with_a_fold():
    # u_0 = c x^2 / 2 along axis 0: J = 1 + c x (central differences are exact), negative for x > 1/|c|
    c, shape = -0.095, (16, 8, 8)
    x = np.arange(shape[0], dtype=np.float64)
    field = np.zeros((3, *shape))
    field[0] = (c * x**2 / 2)[:, None, None]
    inner = 1 + c * x[2:-2]  # the Learn2Reg crop of 2 voxels
    assert metrics.sdlogj(field) == pytest.approx(np.log(inner + 3).std())
    assert metrics.std_log_jacobian(field) == pytest.approx(np.log(inner[inner > 0]).std())
    assert metrics.folding_percent(field) == pytest.approx(100 * 5 / 16)  # x = 11..15
    # the same field as a batched torch tensor
    assert metrics.sdlogj(torch.from_numpy(field)[None].float()) == pytest.approx(metrics.sdlogj(field), rel=1e-5)


def test_tre_of_known_points():
    fixed = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    moving = fixed + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    mean, distances = metrics.tre(fixed, torch.from_numpy(moving))
    np.testing.assert_allclose(distances, [5.0, 0.0, 1.0])
    assert mean == pytest.approx(2.0)


def test_endpoint_error_of_a_constant_offset_inside_a_mask():
    true = np.random.default_rng(0).normal(size=(3, 8, 8, 8))
    field = true + np.array([3.0, 0.0, -4.0]).reshape(3, 1, 1, 1)
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[2:6, 2:6, 2:6] = True
    field[:, ~mask] += 10.0  # errors outside the mask do not count
    mean, p95 = metrics.endpoint_error(field[None], true, mask=mask)
    assert (mean, p95) == (pytest.approx(5.0), pytest.approx(5.0))
    assert metrics.endpoint_error(field, true)[0] > 5.0


def test_registration_metrics_is_json_ready():
    fixed = three_labels()
    warped = np.where(fixed == 5, 0, fixed)
    field = spatial.affine_field(torch.diag(torch.tensor([1.1, 1.0, 1.0, 1.0])), fixed.shape)
    result = metrics.registration_metrics(field, fixed, warped, spacing=(1, 1, 1), moving_labels=fixed)
    json.dumps(result, allow_nan=False)
    assert result["dice"] == {"1": 1.0, "2": 1.0, "5": 0.0}
    assert result["dice_mean"] == pytest.approx(2 / 3)
    assert result["hd95"] == {"1": 0.0, "2": 0.0, "5": None}  # lost label: infinite distance
    assert result["hd95_mean"] is None and result["n_labels"] == 3
    assert result["sdlogj"] == pytest.approx(0.0, abs=1e-6) and result["folding_percent"] == 0.0
    assert result["std_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    assert set(metrics.registration_metrics(field)) == {"sdlogj", "std_log_jacobian", "folding_percent"}
    with pytest.raises(ValueError):
        metrics.registration_metrics(field, fixed, warped)
