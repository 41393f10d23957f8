"""Registration quality metrics with the Learn2Reg definitions (DESIGN.md §5), in numpy / scipy.

Inputs are numpy arrays or torch tensors (converted). Label maps are ``(X, Y, Z)`` integer arrays,
leading singleton axes allowed (``(1, 1, X, Y, Z)``); displacement fields are ``(3, X, Y, Z)`` or
``(1, 3, X, Y, Z)``. Label scores are dicts ``{label: value}`` over the scored labels: every positive
label (or every one of ``labels``) present in the fixed map and in the moving map, which is
``moving_labels`` when given (Learn2Reg checks presence before warping) and the warped map otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from rwcflow import spatial

ArrayLike = np.ndarray | torch.Tensor

# Crop of the field border before SDlogJ (Learn2Reg).
JACOBIAN_CROP = 2


def _numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _volume(array: ArrayLike) -> np.ndarray:
    """A 3-D array from ``(X, Y, Z)`` or the same with leading singleton axes."""
    volume = _numpy(array)
    while volume.ndim > 3 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {tuple(_numpy(array).shape)}")
    return volume


def _label_map(array: ArrayLike) -> np.ndarray:
    volume = _volume(array)
    return volume if np.issubdtype(volume.dtype, np.integer) else np.rint(volume).astype(np.int64)


def _vector_field(field: ArrayLike) -> np.ndarray:
    """A ``(3, X, Y, Z)`` float64 array from ``(3, X, Y, Z)`` or ``(1, 3, X, Y, Z)``."""
    array = _numpy(field).astype(np.float64)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, X, Y, Z) or (1, 3, X, Y, Z) field, got shape {array.shape}")
    return array


def _scored_labels(fixed: np.ndarray, moving: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    """The positive labels (of ``labels``, or of the fixed map) present in both maps, sorted."""
    present = np.intersect1d(np.unique(fixed), np.unique(moving))
    if labels is not None:
        present = np.intersect1d(present, np.asarray(list(labels)))
    return [int(label) for label in present if label > 0]


def _label_pairs(
    fixed_labels: ArrayLike, warped_labels: ArrayLike, labels: Iterable[int] | None, moving_labels: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Fixed and warped label maps as 3-D integer arrays, and the labels to score."""
    fixed, warped = _label_map(fixed_labels), _label_map(warped_labels)
    if fixed.shape != warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} and {warped.shape}")
    moving = warped if moving_labels is None else _label_map(moving_labels)
    return fixed, warped, _scored_labels(fixed, moving, labels)


def mean_score(scores: dict[int, float]) -> float:
    """Mean of per-label scores (NaN when no label was scored)."""
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def dice(
    fixed_labels: ArrayLike,
    warped_labels: ArrayLike,
    labels: Iterable[int] | None = None,
    *,
    moving_labels: ArrayLike | None = None,
) -> dict[int, float]:
    """Dice ``2 |F ∩ W| / (|F| + |W|)`` per scored label (see the module docstring); mean with :func:`mean_score`."""
    fixed, warped, scored = _label_pairs(fixed_labels, warped_labels, labels, moving_labels)
    scores = {}
    for label in scored:
        f, w = fixed == label, warped == label
        scores[label] = float(2.0 * np.count_nonzero(f & w) / (np.count_nonzero(f) + np.count_nonzero(w)))
    return scores


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (or outside the array)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of two boxes, grown by one voxel within ``shape``."""
    return tuple(
        slice(max(min(p.start, q.start) - 1, 0), min(max(p.stop, q.stop) + 1, n)) for p, q, n in zip(a, b, shape)
    )


def _percentile_hausdorff(fixed: np.ndarray, warped: np.ndarray, spacing: np.ndarray, percentile: float) -> float:
    """Larger of the two directed surface-distance percentiles of two non-empty boolean masks."""
    surface_f, surface_w = _surface(fixed), _surface(warped)
    f_to_w = ndimage.distance_transform_edt(~surface_w, sampling=spacing)[surface_f]
    w_to_f = ndimage.distance_transform_edt(~surface_f, sampling=spacing)[surface_w]
    return float(max(np.percentile(d, percentile, method="inverted_cdf") for d in (f_to_w, w_to_f)))


def hd95(
    fixed_labels: ArrayLike,
    warped_labels: ArrayLike,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
    *,
    moving_labels: ArrayLike | None = None,
    percentile: float = 95.0,
) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per scored label (see the module docstring).

    Definition: the surface of a label is its voxels with a face neighbour outside it. For each surface
    voxel of the fixed label, the distance (in mm, ``spacing`` = voxel sizes of the grid) to the
    nearest surface voxel of the warped label, and the other way round; HD95 is the larger of the two
    directed 95th percentiles, each the smallest distance within which lie at least 95 % of the
    surface voxels (``numpy.percentile(method="inverted_cdf")``). This is Learn2Reg's
    ``compute_robust_hausdorff`` with equal weights per surface voxel instead of surfel areas.
    ``percentile=100`` gives the Hausdorff distance. A label missing from the warped map scores ``inf``.
    """
    fixed, warped, scored = _label_pairs(fixed_labels, warped_labels, labels, moving_labels)
    spacing = np.asarray(spacing, dtype=np.float64)
    fixed_boxes, warped_boxes = ndimage.find_objects(fixed), ndimage.find_objects(warped)
    scores = {}
    for label in scored:
        warped_box = warped_boxes[label - 1] if label <= len(warped_boxes) else None
        if warped_box is None:
            scores[label] = float("inf")
            continue
        # Both surfaces lie in the union of the bounding boxes grown by one voxel: distances are exact there.
        box = _union_box(fixed_boxes[label - 1], warped_box, fixed.shape)
        scores[label] = _percentile_hausdorff(fixed[box] == label, warped[box] == label, spacing, percentile)
    return scores


def _jacobian(field: ArrayLike) -> np.ndarray:
    """Jacobian determinant ``(X, Y, Z)`` of ``x -> x + field(x)`` (:func:`rwcflow.spatial.jacobian_determinant`)."""
    tensor = torch.from_numpy(_vector_field(field))[None]
    return spatial.jacobian_determinant(tensor)[0, 0].numpy()


def _cropped(jacobian: np.ndarray) -> np.ndarray:
    c = JACOBIAN_CROP
    if min(jacobian.shape) <= 2 * c:
        raise ValueError(f"field of shape {jacobian.shape} too small for a {c}-voxel crop")
    return jacobian[c:-c, c:-c, c:-c]


def _sdlogj(jacobian: np.ndarray) -> float:
    return float(np.log(np.clip(_cropped(jacobian) + 3.0, 1e-9, 1e9)).std())


def _std_log_jacobian(jacobian: np.ndarray) -> float:
    inner = _cropped(jacobian)
    positive = inner[inner > 0]
    return float(np.log(positive).std()) if positive.size else float("nan")


def _folding_percent(jacobian: np.ndarray) -> float:
    return float(100.0 * np.mean(jacobian <= 0))


def sdlogj(field: ArrayLike) -> float:
    """Learn2Reg's SDlogJ: std of ``log(clip(J + 3, 1e-9, 1e9))`` over the field cropped by 2 voxels.

    ``field`` is in voxel units of its grid; ``J`` is the Jacobian determinant of ``x -> x + field(x)``.
    """
    return _sdlogj(_jacobian(field))


def std_log_jacobian(field: ArrayLike) -> float:
    """Plain std of ``log J`` over the voxels with ``J > 0`` of the field cropped by 2 voxels (NaN if none)."""
    return _std_log_jacobian(_jacobian(field))


def folding_percent(field: ArrayLike) -> float:
    """Percentage of voxels of the whole field (no crop) with Jacobian determinant ``J <= 0``."""
    return _folding_percent(_jacobian(field))


def tre(fixed_points_mm: ArrayLike, moving_points_mm: ArrayLike) -> tuple[float, np.ndarray]:
    """Target registration error: mean and per-point Euclidean distances (mm) between paired ``(N, 3)`` points.

    Pass the fixed keypoints mapped by the registration and their corresponding moving keypoints, both
    in millimetres in the same space.
    """
    fixed, moving = _numpy(fixed_points_mm).astype(np.float64), _numpy(moving_points_mm).astype(np.float64)
    if fixed.shape != moving.shape or fixed.ndim != 2 or fixed.shape[1] != 3:
        raise ValueError(f"expected two (N, 3) point arrays, got {fixed.shape} and {moving.shape}")
    distances = np.linalg.norm(fixed - moving, axis=1)
    return float(distances.mean()), distances


def endpoint_error(
    field_mm: ArrayLike, true_field_mm: ArrayLike, mask: ArrayLike | None = None
) -> tuple[float, float]:
    """Mean and 95th percentile (linear interpolation) of ``|field - true_field|`` in mm inside ``mask``."""
    error = np.linalg.norm(_vector_field(field_mm) - _vector_field(true_field_mm), axis=0)
    if mask is not None:
        error = error[_volume(mask).astype(bool)]
    if error.size == 0:
        raise ValueError("the mask selects no voxel")
    return float(error.mean()), float(np.percentile(error, 95))


def image_correlation(reference: ArrayLike, image: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Pearson correlation of two images' intensities over ``mask`` (default: the whole volume)."""
    a, b = _volume(reference).astype(np.float64), _volume(image).astype(np.float64)
    if mask is not None:
        inside = _volume(mask).astype(bool)
        a, b = a[inside], b[inside]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _json_number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def registration_metrics(
    field: ArrayLike,
    fixed_labels: ArrayLike | None = None,
    warped_labels: ArrayLike | None = None,
    spacing: Sequence[float] | None = None,
    *,
    labels: Iterable[int] | None = None,
    moving_labels: ArrayLike | None = None,
) -> dict:
    """The metrics of one registration as a JSON-ready dict (written as ``metrics.json``).

    ``field`` is the displacement in voxel units of the fixed grid, ``spacing`` that grid's voxel sizes
    in mm. Keys (numbers that are not finite become ``None``):

    * ``sdlogj``: :func:`sdlogj`; ``std_log_jacobian``: :func:`std_log_jacobian`;
      ``folding_percent``: :func:`folding_percent`.
    * with label maps only: ``dice`` and ``hd95`` (mm), ``{"<label>": value}`` per scored label;
      ``dice_mean`` and ``hd95_mean``, their means; ``n_labels``, the number of scored labels.
    """
    result = {}
    if fixed_labels is not None or warped_labels is not None:
        if fixed_labels is None or warped_labels is None or spacing is None:
            raise ValueError("label metrics need fixed_labels, warped_labels and spacing")
        dice_scores = dice(fixed_labels, warped_labels, labels, moving_labels=moving_labels)
        hd95_scores = hd95(fixed_labels, warped_labels, spacing, labels, moving_labels=moving_labels)
        result.update(
            dice_mean=_json_number(mean_score(dice_scores)),
            dice={str(k): _json_number(v) for k, v in dice_scores.items()},
            hd95_mean=_json_number(mean_score(hd95_scores)),
            hd95={str(k): _json_number(v) for k, v in hd95_scores.items()},
            n_labels=len(dice_scores),
        )
    jacobian = _jacobian(field)
    result.update(
        sdlogj=_json_number(_sdlogj(jacobian)),
        std_log_jacobian=_json_number(_std_log_jacobian(jacobian)),
        folding_percent=_json_number(_folding_percent(jacobian)),
    )
    return result
