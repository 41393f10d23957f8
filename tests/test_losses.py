"""Losses: known values, intensity invariances, gradients, and recovery of a known translation."""

import math
from functools import partial

import pytest
import torch

from rwcflow import losses, spatial

SHAPE = (24, 24, 24)


def smooth_image(shift=(0.0, 0.0, 0.0), shape=SHAPE) -> torch.Tensor:
    """A smooth analytic image ``f(x - shift)`` with contrast everywhere (a few sinusoids), ``(1, 1, X, Y, Z)``."""
    x = spatial.identity_grid(shape, dtype=torch.float64)[0] - torch.tensor(shift, dtype=torch.float64).view(3, 1, 1, 1)
    image = torch.sin(2 * math.pi * x[0] / 13 + 0.3) * torch.cos(2 * math.pi * x[1] / 11)
    image = image + 0.6 * torch.sin(2 * math.pi * (x[2] + 0.5 * x[0]) / 12)
    return image[None, None].float()


def test_identical_images_give_zero_loss():
    image = smooth_image()
    assert losses.mse_loss(image, image).item() == 0.0
    assert losses.mind_loss(image, image).item() == 0.0
    assert losses.ncc_loss(image, image).item() == pytest.approx(0.0, abs=1e-3)


def test_ncc_and_mind_ignore_a_linear_intensity_change_mse_does_not():
    image = smooth_image()
    rescaled = 2.5 * image + 0.3
    assert losses.ncc_loss(image, rescaled).item() == pytest.approx(losses.ncc_loss(image, image).item(), abs=1e-5)
    assert losses.mind_loss(image, rescaled).item() < 1e-8
    assert losses.mse_loss(image, rescaled).item() > 0.1
    assert losses.ncc_loss(image, -image).item() == pytest.approx(2.0, abs=1e-3)  # inverted contrast
    # squared (ANTs' CC): a linear change, inverted or not, is a perfect match
    assert losses.ncc_loss(image, -2.5 * image + 0.3, squared=True).item() == pytest.approx(0.0, abs=1e-3)
    # ...while all three notice a misalignment
    moved = smooth_image(shift=(2.0, 0.0, 0.0))
    for loss in (losses.mse_loss, losses.ncc_loss, losses.mind_loss):
        assert loss(image, moved).item() > 10 * loss(image, image).item() + 1e-4


def test_mse_mask_restricts_the_mean():
    fixed = torch.zeros(1, 1, 4, 4, 4)
    warped = fixed.clone()
    warped[..., :2, :, :] = 2.0
    mask = torch.zeros_like(fixed)
    mask[..., :2, :2, :] = 1
    assert losses.mse_loss(fixed, warped).item() == pytest.approx(2.0)
    assert losses.mse_loss(fixed, warped, mask=mask).item() == pytest.approx(4.0)
    assert losses.ncc_loss(fixed, warped, window=3, mask=mask).item() == pytest.approx(1.0)  # flat: uncorrelated


def test_mind_ssc_of_a_ramp_has_the_analytic_value():
    # I = x along axis 0: the 8 pairs that differ along axis 0 have D = d^2, the other 4 have D = 0, so
    # V = 8 d^2 / 12 and MIND = exp(-1.5) on those 8 channels, 1 on the others (away from the border).
    dilation, radius = 2, 1
    ramp = spatial.identity_grid((16, 12, 12))[:, :1]
    mind = losses.mind_ssc(ramp, radius=radius, dilation=dilation)
    assert mind.shape == (1, 12, 16, 12, 12)
    inner = mind[..., 4:-4, 4:-4, 4:-4]
    along_x = torch.tensor([p[0] != q[0] for p, q in losses._SSC_PAIRS])
    assert along_x.sum() == 8
    torch.testing.assert_close(inner[:, along_x], torch.full_like(inner[:, along_x], math.exp(-1.5)))
    torch.testing.assert_close(inner[:, ~along_x], torch.ones_like(inner[:, ~along_x]))


def test_mind_ssc_is_batched_and_per_channel():
    a, b = smooth_image(), smooth_image(shift=(1.0, 2.0, 0.0))
    batched = losses.mind_ssc(torch.cat([a, b]))
    torch.testing.assert_close(batched[1:], losses.mind_ssc(b))
    two_channels = losses.mind_ssc(torch.cat([a, b], dim=1))
    assert two_channels.shape == (1, 24, *SHAPE)
    torch.testing.assert_close(two_channels[:, 12:], losses.mind_ssc(b))


def test_soft_dice_of_known_overlaps():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[..., :4, :, :] = 1
    labels[..., 4:, :4, :] = 2
    onehot = spatial.one_hot(labels, [1, 2])
    assert losses.soft_dice_loss(onehot, onehot).item() == pytest.approx(0.0, abs=1e-7)
    disjoint = spatial.one_hot(torch.where(labels > 0, 3 - labels, labels), [1, 2])
    assert losses.soft_dice_loss(onehot, disjoint).item() == pytest.approx(1.0, abs=1e-6)
    # label 1 shifted by 2 voxels: overlap 128 of 256 + 256 voxels -> Dice 0.5; label 2 unchanged -> 1
    shifted = onehot.clone()
    shifted[:, 0] = onehot[:, 0].roll(2, dims=1)
    assert losses.soft_dice_loss(onehot, shifted).item() == pytest.approx(1 - (0.5 + 1.0) / 2, abs=1e-6)


def test_dice_gradient_reaches_the_field_through_soft_warped_labels():
    labels = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    labels[..., 3:9, 3:9, 3:9] = 1
    moving_labels = labels.roll(2, dims=2)  # moved 2 voxels along axis 0: u = (2, 0, 0) aligns it
    fixed = spatial.one_hot(labels, [1])
    moving = spatial.one_hot(moving_labels, [1])
    field = torch.zeros(1, 3, 12, 12, 12, requires_grad=True)

    # the reference code's way: nearest-neighbour warped labels, no gradient reaches the field
    nearest = spatial.one_hot(spatial.warp_labels(moving_labels, field), [1])
    assert not nearest.requires_grad

    loss = losses.soft_dice_loss(fixed, spatial.warp_one_hot(moving, field))
    loss.backward()
    assert field.grad.abs().sum() > 0
    # following the gradient improves the overlap: it pushes the field toward the shift along axis 0
    with torch.no_grad():
        stepped = field - 0.5 * field.grad / field.grad.abs().max()
    assert losses.soft_dice_loss(fixed, spatial.warp_one_hot(moving, stepped)).item() < loss.item()
    assert field.grad[:, 0].sum() < 0  # increasing u along axis 0 lowers the loss


@pytest.mark.parametrize("loss", [losses.mse_loss, losses.ncc_loss, partial(losses.ncc_loss, squared=True),
                                  losses.mind_loss], ids=["mse", "ncc", "squared ncc", "mind"])
def test_gradient_steps_recover_a_known_translation(loss):
    shift = torch.tensor([1.5, -1.0, 0.75])
    fixed = smooth_image()
    moving = smooth_image(shift=tuple(shift.tolist()))  # moving(x) = fixed(x - shift): u = shift aligns them
    inside = (..., slice(3, -3), slice(3, -3), slice(3, -3))  # away from the clamped border of the warp
    translation = torch.zeros(3, requires_grad=True)
    optimiser = torch.optim.Adam([translation], lr=0.1)
    for _ in range(60):
        optimiser.zero_grad()
        field = translation.view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)
        loss(fixed[inside], spatial.warp(moving, field)[inside]).backward()
        optimiser.step()
    torch.testing.assert_close(translation.detach(), shift, atol=0.1, rtol=0)


def test_keypoint_loss_is_the_distance_in_mm_with_anisotropic_spacing():
    offset = torch.tensor([1.0, 2.0, -1.0])
    field = offset.view(1, 3, 1, 1, 1).expand(1, 3, 10, 10, 10).clone()
    fixed = torch.tensor([[2.0, 3.0, 4.0], [5.5, 1.25, 7.0], [8.0, 8.0, 2.5]])
    residual = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [3.0, 4.0, 0.0]])  # voxels
    moving = fixed + offset + residual
    spacing = (2.0, 1.0, 0.5)
    # distances: 2 mm, 1 mm, sqrt(6^2 + 4^2) mm
    expected = (2.0 + 1.0 + math.sqrt(52.0)) / 3
    assert losses.keypoint_loss(fixed, moving, field, spacing=spacing).item() == pytest.approx(expected, rel=1e-6)
    assert losses.keypoint_loss(fixed, moving, field).item() == pytest.approx((1 + 2 + 5) / 3, rel=1e-6)
    assert losses.keypoint_loss(fixed, fixed + offset, field, spacing=spacing).item() == pytest.approx(0.0, abs=1e-6)


def test_keypoint_loss_samples_a_linear_field_between_voxels_and_has_gradients():
    matrix = torch.tensor([[1.1, 0.0, 0.05, 0.5], [0.0, 0.9, 0.0, -1.0], [0.1, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]])
    field = spatial.affine_field(matrix, (10, 10, 10)).requires_grad_(True)
    fixed = torch.tensor([[2.3, 3.7, 4.1], [6.5, 5.25, 7.75]])
    mapped = fixed @ matrix[:3, :3].T + matrix[:3, 3]  # exact: trilinear interpolation of a linear field
    moving = mapped + torch.tensor([0.0, 1.0, 0.0])
    loss = losses.keypoint_loss(fixed, moving, field, spacing=torch.tensor([1.0, 3.0, 1.0]))
    assert loss.item() == pytest.approx(3.0, rel=1e-5)
    loss.backward()
    assert field.grad[:, 1].sum() < 0  # moving points lie further along axis 1


def test_keypoint_loss_batched_fields_share_the_points():
    fields = torch.stack([torch.zeros(3, 6, 6, 6), torch.ones(3, 6, 6, 6)])
    fixed = torch.tensor([[1.0, 2.0, 3.0]])
    moving = fixed + 1.0
    # sample 0 misses by sqrt(3) voxels, sample 1 hits
    assert losses.keypoint_loss(fixed, moving, fields).item() == pytest.approx(math.sqrt(3) / 2, rel=1e-6)


def test_diffusion_loss_of_constant_and_linear_fields():
    constant = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(2, 3, 8, 9, 10)
    assert losses.diffusion_loss(constant).item() == 0.0
    gradient = torch.tensor([[0.1, 0.0, -0.2], [0.3, 0.0, 0.0], [0.0, 0.4, 0.1]])
    matrix = torch.eye(4)
    matrix[:3, :3] += gradient
    linear = spatial.affine_field(matrix, (8, 9, 10))
    assert losses.diffusion_loss(linear).item() == pytest.approx((gradient**2).sum().item() / 9, rel=1e-5)
