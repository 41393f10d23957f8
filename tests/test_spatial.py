"""rwcflow.spatial against analytic answers: translations, scalings, rotations, linear and smooth fields."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation
import pytest
import torch
from scipy.linalg import expm

from rwcflow import spatial

SHAPE = (20, 16, 12)  # not a cube, so a swapped axis shows


def multilinear(coords: torch.Tensor) -> torch.Tensor:
    """A function trilinear interpolation reproduces exactly, at voxel coordinates ``(B, 3, ...)``."""
    x, y, z = coords[:, 0:1], coords[:, 1:2], coords[:, 2:3]
    return 0.3 * x - 0.2 * y + 0.5 * z + 0.01 * x * y - 0.02 * y * z + 0.003 * x * y * z + 1.0


def constant_field(shift, shape=SHAPE) -> torch.Tensor:
    return torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()


def linear_field(matrix: np.ndarray, centre, shape) -> torch.Tensor:
    """The field ``u(x) = matrix (x - centre)``."""
    offset = torch.tensor(centre, dtype=torch.float64).view(1, 3, 1, 1, 1)
    grid = spatial.identity_grid(shape, dtype=torch.float64) - offset
    return torch.einsum("ij,bjxyz->bixyz", torch.as_tensor(matrix, dtype=torch.float64), grid).float()


def interior(tensor: torch.Tensor, margin: int) -> torch.Tensor:
    return tensor[..., margin:-margin, margin:-margin, margin:-margin]


def rotation(angles) -> np.ndarray:
    """Rotation matrix from angles (radians) about the x, y and z axes (``Rz @ Ry @ Rx``)."""
    return Rotation.from_euler("xyz", angles).as_matrix()


def about_centre(linear: np.ndarray, centre) -> np.ndarray:
    """The 4x4 affine applying ``linear`` about ``centre``."""
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(centre) - linear @ np.asarray(centre)
    return matrix


def test_identity_grid_holds_voxel_indices():
    grid = spatial.identity_grid(SHAPE)
    assert grid.shape == (1, 3, *SHAPE)
    assert grid[0, 0, 5, 2, 7] == 5 and grid[0, 1, 5, 2, 7] == 2 and grid[0, 2, 5, 2, 7] == 7


def test_warp_integer_translation_shifts_the_image(smooth_volume):
    image = smooth_volume(SHAPE)
    warped = spatial.warp(image, constant_field((2.0, -3.0, 1.0)))
    expected = image[..., 2:, :-3, 1:]  # out[x] = image[x + t]
    assert torch.allclose(warped[..., :-2, 3:, :-1], expected, atol=1e-5)


@pytest.mark.parametrize("shift", [(0.4, -1.7, 2.25), (-3.5, 0.5, -0.75)])
def test_warp_fractional_translation_is_the_shifted_function(shift):
    grid = spatial.identity_grid(SHAPE)
    image = multilinear(grid)
    warped = spatial.warp(image, constant_field(shift))
    # border padding clamps the sampling position to the grid
    upper = torch.tensor([n - 1 for n in SHAPE], dtype=torch.float32).view(1, 3, 1, 1, 1)
    target = torch.minimum(torch.clamp(grid + constant_field(shift), min=0), upper)
    assert torch.allclose(warped, multilinear(target), atol=1e-4)
    zeros = spatial.warp(image, constant_field(shift), padding_mode="zeros")
    outside = ((grid + constant_field(shift) < -1) | (grid + constant_field(shift) > upper + 1)).any(1, keepdim=True)
    assert outside.any() and torch.all(zeros[outside] == 0)


def test_sample_half_precision_image_keeps_the_coordinates_precision():
    # a ramp along a long axis, exact in float16 (integers); sampled a quarter voxel off every voxel
    # centre: the answer is the coordinate itself. float16 coordinates would be off by up to ~0.06
    # voxel here (1e-3 relative in the normalised grid); float32 ones are not.
    n = 256
    ramp = torch.arange(n, dtype=torch.float16).reshape(1, 1, n, 1, 1).expand(1, 1, n, 2, 2)
    coords = torch.zeros(1, 3, n - 1, 2, 2)
    coords[:, 0] = torch.arange(n - 1, dtype=torch.float32).reshape(-1, 1, 1) + 0.25
    coords[:, 1] = torch.arange(2.0).reshape(1, -1, 1)
    coords[:, 2] = torch.arange(2.0).reshape(1, 1, -1)
    sampled = spatial.sample(ramp, coords)
    assert sampled.dtype == torch.float32
    torch.testing.assert_close(sampled[0, 0], coords[0, 0], atol=1e-4, rtol=0)


def test_sample_at_arbitrary_points_and_broadcast_batches():
    image = multilinear(spatial.identity_grid(SHAPE))
    generator = torch.Generator().manual_seed(0)
    upper = torch.tensor([n - 1 for n in SHAPE], dtype=torch.float32).view(1, 3, 1, 1, 1)
    points = torch.rand((2, 3, 5, 4, 3), generator=generator) * upper  # two batches, another grid shape
    values = spatial.sample(image, points)
    assert values.shape == (2, 1, 5, 4, 3)
    assert torch.allclose(values, multilinear(points), atol=1e-4)


def test_warp_labels_nearest_keeps_label_values():
    generator = torch.Generator().manual_seed(1)
    values = torch.tensor([0, 3, 7, 42], dtype=torch.int64)
    labels = values[torch.randint(0, 4, (1, 1, *SHAPE), generator=generator)]
    small = spatial.warp_labels(labels, constant_field((0.3, -0.4, 0.45)))
    assert small.dtype == labels.dtype
    assert torch.equal(small, labels)  # every position rounds to its own voxel
    shifted = spatial.warp_labels(labels, constant_field((1.6, 0.0, -2.2)))
    assert torch.equal(shifted[..., :-2, :, 2:], labels[..., 2:, :, :-2])
    assert torch.all(shifted[..., -1:, :, :] == 0)  # beyond the grid: background
    assert set(shifted.unique().tolist()) <= set(values.tolist())


def test_one_hot_channels():
    labels = torch.tensor([0, 5, 2, 5]).view(1, 1, 4, 1, 1)
    encoded = spatial.one_hot(labels, [2, 5])
    assert encoded.shape == (1, 2, 4, 1, 1)
    assert encoded[0, :, :, 0, 0].tolist() == [[0, 0, 1, 0], [0, 1, 0, 1]]


def test_warp_one_hot_translates_and_passes_gradients_to_the_field():
    centre = torch.tensor([n / 2 for n in SHAPE]).view(1, 3, 1, 1, 1)
    radius = (spatial.identity_grid(SHAPE) - centre).norm(dim=1, keepdim=True)
    labels = (radius < 5).long() + (radius < 3).long()
    encoded = spatial.one_hot(labels, [1, 2])
    shift = constant_field((2.0, 0.0, -1.0))
    expected = spatial.one_hot(spatial.warp_labels(labels, shift), [1, 2])
    assert torch.allclose(spatial.warp_one_hot(encoded, shift), expected, atol=1e-5)
    field = constant_field((0.3, -0.2, 0.1)).requires_grad_(True)
    warped = spatial.warp_one_hot(encoded, field)
    loss = ((warped - encoded) ** 2).sum()
    loss.backward()
    assert field.grad is not None and torch.all(torch.isfinite(field.grad))
    assert field.grad.abs().sum() > 0
    # moving the field towards zero displacement lowers the loss along every axis
    assert torch.all(field.grad.sum(dim=(2, 3, 4)).sign() == torch.tensor([[1.0, -1.0, 1.0]]))


def test_compose_of_translations_is_their_sum():
    a, b = (1.5, -2.0, 0.25), (-0.5, 3.0, 1.0)
    composed = spatial.compose(constant_field(a), constant_field(b))
    assert torch.allclose(composed, constant_field((1.0, 1.0, 1.25)), atol=1e-5)


def test_compose_law_matches_successive_warps(smooth_field, smooth_volume):
    shape = (24, 24, 24)
    first, second = smooth_field(shape, 2.0, seed=1), smooth_field(shape, 2.0, seed=2)
    composed = spatial.compose(first, second)
    # exact for an affine image: both sides interpolate the same grid function
    linear = 0.3 * spatial.identity_grid(shape)[:, :1] - 0.7 * spatial.identity_grid(shape)[:, 2:] + 2.0
    twice = spatial.warp(spatial.warp(linear, second), first)
    assert torch.allclose(interior(twice, 4), interior(spatial.warp(linear, composed), 4), atol=1e-4)
    # a smooth image: equal up to interpolation error
    image = smooth_volume(shape)
    twice = spatial.warp(spatial.warp(image, second), first)
    difference = interior(twice - spatial.warp(image, composed), 4).abs()
    assert difference.max() < 0.05 * (image.max() - image.min())


def test_field_composed_with_its_inverse_is_zero(smooth_field):
    field = smooth_field((32, 32, 32), 2.0)
    inverse = spatial.invert_field(field)
    inverse_then_field = interior(spatial.compose(inverse, field), 4)  # what the fixed point solves
    field_then_inverse = interior(spatial.compose(field, inverse), 4)  # limited by trilinear interpolation
    assert inverse_then_field.abs().max() < 1e-3
    assert field_then_inverse.abs().max() < 0.1
    assert field_then_inverse.norm(dim=1).mean() < 0.03
    assert field.norm(dim=1).mean() > 0.5  # the field itself is far from zero


def test_invert_translation_and_scaling():
    assert torch.allclose(spatial.invert_field(constant_field((1.25, -2.0, 0.5))), constant_field((-1.25, 2.0, -0.5)))
    shape, centre = (24, 24, 24), (11.5, 11.5, 11.5)
    scale = np.diag([1.1, 0.9, 1.05])
    inverse = spatial.invert_field(linear_field(scale - np.eye(3), centre, shape))
    expected = linear_field(np.linalg.inv(scale) - np.eye(3), centre, shape)
    assert torch.allclose(interior(inverse, 3), interior(expected, 3), atol=1e-4)


@pytest.mark.parametrize("old, new", [((32, 32, 32), (64, 64, 64)), ((32, 24, 20), (17, 40, 20))])
def test_resize_field_keeps_an_affine_mapping(old, new):
    rng = np.random.default_rng(3)
    matrix, shift = 0.1 * rng.standard_normal((3, 3)), np.array([1.5, -2.0, 0.75])
    field = linear_field(matrix, (0, 0, 0), old) + torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1)
    resized = spatial.resize_field(field, new)
    # new voxel y sits at old voxel y / s, and displacements grow by s = (new - 1) / (old - 1)
    s = np.array([(n - 1) / (o - 1) for o, n in zip(old, new)])
    expected = linear_field(np.diag(s) @ matrix @ np.diag(1 / s), (0, 0, 0), new)
    expected = expected + torch.tensor(s * shift, dtype=torch.float32).view(1, 3, 1, 1, 1)
    assert resized.shape == (1, 3, *new)
    assert torch.allclose(resized, expected, atol=1e-4)


def test_resize_field_constant_translation():
    resized = spatial.resize_field(constant_field((2.0, -1.0, 0.5), (32, 32, 32)), (64, 64, 64))
    assert torch.allclose(resized, constant_field((2.0 * 63 / 31, -63 / 31, 0.5 * 63 / 31), (64, 64, 64)), atol=1e-5)
    back = spatial.resize_field(resized, (32, 32, 32))
    assert torch.allclose(back, constant_field((2.0, -1.0, 0.5), (32, 32, 32)), atol=1e-5)


def test_integrate_constant_velocity_gives_the_same_translation():
    velocity = constant_field((1.7, -0.6, 2.4))
    assert torch.allclose(spatial.integrate_velocity(velocity), velocity, atol=1e-5)


def test_integrate_linear_velocity_is_the_matrix_exponential():
    shape, centre = (32, 32, 32), (15.5, 15.5, 15.5)
    generator = np.array([[0.05, -0.25, 0.1], [0.25, -0.05, 0.0], [-0.1, 0.05, 0.1]])  # rotation + scaling
    field = spatial.integrate_velocity(linear_field(generator, centre, shape))
    expected = linear_field(expm(generator) - np.eye(3), centre, shape)
    assert interior(expected, 8).abs().max() > 1.0
    assert torch.allclose(interior(field, 8), interior(expected, 8), atol=2e-2)


def test_integrated_velocity_does_not_fold(smooth_field):
    velocity = smooth_field((32, 32, 32), 6.0, sigma=4.0)
    assert spatial.jacobian_determinant(velocity).min() < 0  # used directly as a displacement, it folds
    field = spatial.integrate_velocity(velocity)
    assert spatial.jacobian_determinant(field).min() > 0
    assert field.abs().max() > 3.0


def test_spatial_gradient_of_a_quadratic():
    x, y, z = spatial.identity_grid(SHAPE)[0]
    field = torch.stack([y**2, 3 * x, x * z])[None]
    grad = spatial.spatial_gradient(field)[0]  # (channel, axis, X, Y, Z)
    assert grad.shape == (3, 3, *SHAPE)
    expected = torch.stack([torch.stack([0 * x, 2 * y, 0 * x]),
                            torch.stack([3 + 0 * x, 0 * x, 0 * x]),
                            torch.stack([z, 0 * x, x])])
    # central differences are exact for quadratics inside; one-sided ones at the border are not
    assert torch.allclose(interior(grad, 1), interior(expected, 1), atol=1e-4)
    assert torch.allclose(grad[1], expected[1])


@pytest.mark.parametrize("shape", [(16, 16, 16), SHAPE])
def test_jacobian_of_scaling_and_rotation(shape):
    scaling = spatial.affine_field(torch.diag(torch.tensor([1.1, 0.9, 1.2, 1.0])), shape)
    assert torch.allclose(spatial.jacobian_determinant(scaling), torch.full((1, 1, *shape), 1.188), atol=1e-5)
    centre = [(n - 1) / 2 for n in shape]
    turn = torch.tensor(about_centre(rotation((0.3, -0.5, 0.8)), centre), dtype=torch.float32)
    det = spatial.jacobian_determinant(spatial.affine_field(turn, shape))
    assert torch.allclose(det, torch.ones(1, 1, *shape), atol=1e-5)


def test_jacobian_matrix_rows_are_outputs_columns_are_derivatives():
    field = torch.zeros(1, 3, *SHAPE)
    field[:, 0] = 0.5 * spatial.identity_grid(SHAPE)[:, 2]  # shear: u_0 grows along axis 2
    matrix = spatial.jacobian_matrix(field)
    assert matrix.shape == (1, *SHAPE, 3, 3)
    assert torch.allclose(matrix[0, 4, 5, 6], torch.tensor([[1.0, 0, 0.5], [0, 1, 0], [0, 0, 1]]))
    assert torch.allclose(spatial.jacobian_determinant(field), torch.ones(1, 1, *SHAPE))


@pytest.mark.parametrize("axis", [0, 2])
def test_jacobian_detects_a_fold(axis):
    n, amplitude = 32, 8.0
    k, centre = 2 * math.pi / n, n // 2
    field = torch.zeros(1, 3, n, n, n)
    position = spatial.identity_grid((n, n, n))[:, axis]
    field[:, axis] = -amplitude * torch.sin(k * (position - centre))
    det = spatial.jacobian_determinant(field)[0, 0].movedim(axis, 0)
    # central differences of sin: derivative factor sin(k) / 1 instead of k
    expected = 1 - amplitude * math.sin(k) * torch.cos(k * (torch.arange(n) - centre))
    assert torch.allclose(det[1:-1], expected[1:-1].view(-1, 1, 1).expand_as(det[1:-1]), atol=1e-4)
    assert torch.all(det[centre] <= 0)
    assert torch.all(det[centre - 16 + 1 : centre - 8] > 0)


def test_affine_field_of_a_rotation_matches_rotated_coordinates():
    shape = (12, 10, 8)
    centre = np.array([5.5, 4.5, 3.5])
    matrices = [about_centre(rotation(angles), centre) for angles in [(0.2, 0.0, 0.0), (0.1, -0.4, 0.7)]]
    field = spatial.affine_field(torch.tensor(np.stack(matrices), dtype=torch.float64), shape)
    points = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    for batch, matrix in enumerate(matrices):
        rotated = (points - centre) @ matrix[:3, :3].T + centre
        assert np.allclose(field[batch].permute(1, 2, 3, 0).numpy() + points, rotated, atol=1e-9)
    single = spatial.affine_field(torch.tensor(matrices[1], dtype=torch.float64), shape)
    assert torch.allclose(single, field[1:])


def test_box_smooth_keeps_linear_ramps_inside_and_averages_neighbours():
    ramp = spatial.identity_grid((9, 8, 7))  # three linear ramps, one per channel
    smoothed = spatial.box_smooth(ramp, passes=2)
    torch.testing.assert_close(smoothed[..., 2:-2, 2:-2, 2:-2], ramp[..., 2:-2, 2:-2, 2:-2])
    spike = torch.zeros(1, 1, 5, 5, 5)
    spike[0, 0, 2, 2, 2] = 1.0
    weighted = spatial.box_smooth(spike, passes=1, weights=(0.25, 0.5, 0.25))
    assert weighted[0, 0, 2, 2, 2].item() == pytest.approx(0.125)
    assert weighted[0, 0, 1, 2, 2].item() == pytest.approx(0.0625)
    assert weighted.sum().item() == pytest.approx(1.0)


def test_bspline_sampling_blurs_alike_at_every_sub_voxel_position():
    """Through the cubic B-spline kernel a linear ramp is reproduced and a parabola ``x^2`` comes out as
    ``x^2 + 1/3`` (the kernel's variance) wherever it is sampled, with the derivative ``2x``; trilinear
    interpolation's error on it, ``t (1 - t)`` at a fraction ``t`` of a voxel, vanishes at voxel centres."""
    x = torch.arange(12.0, dtype=torch.float64).view(1, 1, 12, 1, 1).expand(1, 1, 12, 5, 5)
    coords = spatial.identity_grid((12, 5, 5), dtype=torch.float64).clone()
    coords[:, 0] = torch.linspace(2.0, 9.0, 12, dtype=torch.float64).view(12, 1, 1)  # whole and fractional
    coords.requires_grad_(True)
    position = coords[:, 0:1]
    torch.testing.assert_close(spatial.bspline_sample(x, coords), position)
    parabola = spatial.bspline_sample(x**2, coords)
    torch.testing.assert_close(parabola, position**2 + 1 / 3)
    (gradient,) = torch.autograd.grad(parabola.sum(), coords)
    torch.testing.assert_close(gradient[:, 0:1], 2 * position)
    fraction = position - position.floor()
    torch.testing.assert_close(spatial.sample(x**2, coords), position**2 + fraction * (1 - fraction))
