"""Synthetic pairs: known fields, labels and images that stay in correspondence, and the corruptions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rwcflow import spatial
from rwcflow.synth import (
    SynthOptions,
    corrupt,
    gaussian_blur,
    label_intensities,
    random_smooth_field,
    synthesize_pair,
)

CLEAN = dict(gamma=0.0, bias=0.0, blur=0.0, noise=0.0)


def _blobs(shape=(32, 30, 28)) -> torch.Tensor:
    """A label map of nested and neighbouring boxes (labels 1, 2, 5, 9) on a zero background."""
    labels = torch.zeros((1, 1, *shape), dtype=torch.int64)
    labels[..., 4:28, 4:26, 4:24] = 1
    labels[..., 8:20, 8:18, 8:20] = 2
    labels[..., 20:27, 6:24, 10:22] = 5
    labels[..., 10:16, 18:24, 6:12] = 9
    return labels


def test_random_smooth_field_has_the_asked_amplitude_and_is_diffeomorphic():
    field = random_smooth_field((24, 20, 16), 3.0, control_points=4, seed=3)
    assert field.shape == (1, 3, 24, 20, 16)
    assert field.norm(dim=1).amax().item() == pytest.approx(3.0, rel=1e-5)
    assert spatial.jacobian_determinant(field).min() > 0
    assert torch.equal(field, random_smooth_field((24, 20, 16), 3.0, control_points=4, seed=3))


def test_gaussian_blur_keeps_constants_and_spreads_a_point_by_sigma():
    constant = torch.full((1, 2, 9, 8, 7), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 1.5), constant)
    point = torch.zeros(1, 1, 25, 25, 25)
    point[..., 12, 12, 12] = 1.0
    sigma = 1.7
    blurred = gaussian_blur(point, sigma)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    offsets = torch.arange(25, dtype=torch.float32) - 12
    variance = (blurred[0, 0].sum(dim=(1, 2)) * offsets**2).sum().item()  # along the first axis
    assert variance == pytest.approx(sigma**2, rel=0.02)  # the discrete kernel is normalised: ~sigma^2
    assert torch.equal(gaussian_blur(point, 0.0), point)


def test_label_intensities_are_one_value_per_label_with_a_black_background():
    labels = _blobs()
    image = label_intensities(labels, torch.Generator().manual_seed(0))
    assert image.shape == labels.shape and image.dtype == torch.float32
    assert (image[labels == 0] == 0).all()
    for value in (1, 2, 5, 9):
        inside = image[labels == value]
        assert inside.min() == inside.max() and 0 < inside.min() <= 1


def test_corrupt_stays_in_unit_range_and_is_a_rescaling_when_clean():
    image = label_intensities(_blobs(), torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    torch.testing.assert_close(corrupt(image, SynthOptions(**CLEAN), generator), image / image.max())
    noisy = corrupt(image, SynthOptions(gamma=0.5, bias=0.5, blur=1.5, noise=0.1), generator)
    assert noisy.min() >= 0 and noisy.max() == pytest.approx(1.0)
    assert (noisy - image / image.max()).abs().mean() > 0.01


def test_warped_labels_and_images_match_through_the_true_field():
    labels = _blobs()
    options = SynthOptions(max_displacement=5.0, anatomy_displacement=1.5, **CLEAN)
    pair = synthesize_pair(labels, None, options, generator=torch.Generator().manual_seed(5))
    assert pair.true_field.shape == (1, 3, *labels.shape[2:])
    assert 1.25 <= pair.true_field.norm(dim=1).amax() <= 5.0 * 1.1

    # labels: only voxels at label borders differ (nearest neighbour, sampled twice)
    warped_labels = spatial.warp_labels(pair.moving_labels, pair.true_field)
    inner = (..., slice(3, -3), slice(3, -3), slice(3, -3))
    agreement = (warped_labels == pair.fixed_labels)[inner].float().mean()
    before = (pair.moving_labels == pair.fixed_labels)[inner].float().mean()
    assert before < 0.85 and agreement > 0.94
    border = torch.nn.functional.max_pool3d(pair.fixed_labels.float(), 3, stride=1, padding=1) != \
        -torch.nn.functional.max_pool3d(-pair.fixed_labels.float(), 3, stride=1, padding=1)
    assert ((warped_labels != pair.fixed_labels) & ~border).sum() == 0

    warped = spatial.warp(pair.moving, pair.true_field)
    error = (warped - pair.fixed)[inner].abs()
    assert error.mean() < 0.25 * (pair.moving - pair.fixed)[inner].abs().mean()
    # each fixed label region carries the one intensity the moving image gives that label
    for value in (1, 2, 5, 9):
        region = pair.fixed_labels == value
        interior = torch.nn.functional.max_pool3d((~region).float(), 3, stride=1, padding=1) == 0
        moving_value = pair.moving[pair.moving_labels == value].median()
        assert torch.allclose(pair.fixed[interior], moving_value, atol=1e-4)


def test_contrast_is_shared_unless_independent():
    labels = _blobs()
    shared = synthesize_pair(labels, None, SynthOptions(**CLEAN), generator=torch.Generator().manual_seed(5))
    independent = synthesize_pair(labels, None, SynthOptions(independent_contrast=True, **CLEAN),
                                  generator=torch.Generator().manual_seed(5))

    def medians(pair):
        return [(pair.fixed[pair.fixed_labels == v].median(), pair.moving[pair.moving_labels == v].median())
                for v in (1, 2, 5, 9)]

    assert all(math.isclose(f, m, abs_tol=1e-4) for f, m in medians(shared))
    assert max(abs(f - m) for f, m in medians(independent)) > 0.05


def test_real_images_are_deformed_like_their_labels():
    labels = _blobs()
    image = torch.from_numpy(np.random.default_rng(0).random(labels.shape).astype(np.float32)) * (labels > 0)
    options = SynthOptions(real_intensity=1.0, anatomy_displacement=0.0, **CLEAN)
    pair = synthesize_pair(labels, image, options, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(pair.moving, image / image.max())  # no anatomy deformation: the image itself
    torch.testing.assert_close(pair.fixed, spatial.warp(image, pair.true_field) / spatial.warp(image, pair.true_field).max())
    assert torch.equal(pair.fixed_labels, spatial.warp_labels(labels, pair.true_field))


def test_pairs_are_reproducible_from_the_generator_and_options_are_checked():
    labels = _blobs()
    first = synthesize_pair(labels, generator=torch.Generator().manual_seed(7))
    second = synthesize_pair(labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.fixed, second.fixed) and torch.equal(first.true_field, second.true_field)
    for bad in ({"control_points": (1, 4)}, {"real_intensity": 1.5}, {"noise": -0.1}):
        with pytest.raises(ValueError):
            SynthOptions(**bad)
