"""Instance optimisation: a known smooth deformation of real anatomy (MNI152 at 4 mm) is recovered from
zero, refinement from a good start improves it, the label and keypoint terms pull the field the right
way, the mask restricts the similarity and the diffeomorphic option does not fold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwcflow import spatial
from rwcflow.optimize import DEFAULT_REGULARIZATION, REFINEMENT_REGULARIZATION, InstanceOptimization, instance_optimize

SHAPE = (40, 48, 40)  # the MNI152 brain at 4 mm, cropped


def _mni_4mm(loader) -> torch.Tensor:
    """A nilearn MNI152 volume (1 mm, values in [0, 1]) averaged to 4 mm and cropped to ``SHAPE``."""
    data = torch.as_tensor(loader(resolution=1).get_fdata(), dtype=torch.float32)[:196, :232, :188]
    return F.avg_pool3d(data[None, None], 4)[:, :, 5:45, 6:54, 0:40].contiguous()


@pytest.fixture(scope="module")
def anatomy() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNI152 T1 ``(1, 1, *SHAPE)`` and its grey/white-matter probabilities ``(1, 2, *SHAPE)``."""
    from nilearn import datasets

    tissue = [_mni_4mm(datasets.load_mni152_gm_template), _mni_4mm(datasets.load_mni152_wm_template)]
    return _mni_4mm(datasets.load_mni152_template), torch.cat(tissue, dim=1)


@pytest.fixture
def case(anatomy, smooth_field):
    """Fixed = the MNI152 T1 warped by a known smooth field ``truth`` (max about 4.2 voxels, 17 mm), moving
    = the T1, with grey/white-matter labels (probabilities > 0.5) on both and the fixed brain mask."""
    t1, tissue = anatomy
    truth = smooth_field(SHAPE, amplitude=3.5, seed=1)
    return {
        "fixed": spatial.warp(t1, truth),
        "moving": t1,
        "truth": truth,
        "fixed_labels": (spatial.warp(tissue, truth) > 0.5).float(),
        "moving_labels": (tissue > 0.5).float(),
        "brain": spatial.warp(t1, truth) > 0.1,
    }


def _endpoint_error(field: torch.Tensor, case: dict) -> float:
    """Mean endpoint error in voxels inside the fixed brain."""
    return (field - case["truth"]).norm(dim=1, keepdim=True)[case["brain"]].mean().item()


def _dice(field: torch.Tensor, case: dict) -> torch.Tensor:
    """Dice of grey and white matter between the fixed labels and the moving labels warped by ``field``."""
    warped = (spatial.warp_one_hot(case["moving_labels"], field) > 0.5).float()
    dims = (0, 2, 3, 4)
    return 2 * (warped * case["fixed_labels"]).sum(dims) / (warped.sum(dims) + case["fixed_labels"].sum(dims))


def _folding(field: torch.Tensor) -> float:
    """Percentage of voxels whose Jacobian determinant is not positive."""
    return (spatial.jacobian_determinant(field) <= 0).float().mean().item() * 100


@pytest.mark.parametrize(("grid_factor", "tolerance"), [(1, 0.02), (2, 0.15)])
def test_recovers_a_translation(smooth_volume, grid_factor, tolerance):
    """A known translation of a smooth volume whose axes the control grids do not divide evenly. On a
    control grid twice as coarse the moving image, pooled, is interpolated between control voxels:
    that biases sub-voxel shifts by about 0.05 control voxels (0.1 voxel)."""
    shape, shift = (40, 45, 36), torch.tensor([1.5, -1.0, 0.75])
    moving = smooth_volume(shape, sigma=4.0, seed=2)
    fixed = spatial.warp(moving, shift.view(1, 3, 1, 1, 1).expand(1, 3, *shape))
    options = InstanceOptimization(similarity="mse", grid_factor=grid_factor, pyramid_levels=2, iterations=60)
    field = instance_optimize(fixed, moving, options)
    assert field.shape == (1, 3, *shape)
    error = (field - shift.view(1, 3, 1, 1, 1))[..., 4:-4, 4:-4, 4:-4].norm(dim=1)
    assert error.mean() < tolerance and error.max() < 4 * tolerance, (error.mean(), error.max())


def _waves(shape: tuple[int, ...], shift: list[float]) -> torch.Tensor:
    """A sum of plane waves (wavelengths of about 4 to 10 voxels) at ``x + shift``, scaled to [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    vectors, phases = torch.randn(24, 3, generator=generator) * 0.9, torch.rand(24, generator=generator) * 6.28
    points = spatial.identity_grid(shape) + torch.tensor(shift).view(1, 3, 1, 1, 1)
    waves = torch.cos(torch.einsum("kd,bdxyz->bkxyz", vectors, points) + phases.view(1, -1, 1, 1, 1)).sum(1, True)
    return (waves - waves.min()) / (waves.max() - waves.min())


def test_bspline_interpolation_recovers_a_sub_voxel_shift():
    """A shift of a fifth of a voxel of a detailed image (made exactly, not resampled): trilinear sampling
    pulls the estimate towards the voxel grid (to about 0.17, -0.06, 0.02), the B-spline kernel does not."""
    shape, shift = (32, 32, 32), [0.2, -0.15, 0.1]
    fixed, moving = _waves(shape, shift), _waves(shape, [0.0, 0.0, 0.0])
    errors = {}
    for interpolation in ("linear", "bspline"):
        options = InstanceOptimization(similarity="mse", grid_factor=1, pyramid_levels=1, iterations=60,
                                       interpolation=interpolation)
        field = instance_optimize(fixed, moving, options)[..., 4:-4, 4:-4, 4:-4]
        errors[interpolation] = (field - torch.tensor(shift).view(1, 3, 1, 1, 1)).norm(dim=1).mean().item()
    assert errors["bspline"] < 0.04 < 0.1 < errors["linear"], errors


def test_from_zero_recovers_a_known_deformation(case):
    """From zero, through the pyramid (control grids of 4, 8 and 16 mm, as the defaults' 2, 4 and 8 mm
    for 1 mm images), the deformation is mostly recovered without folding, and tissue overlap rises."""
    steps = []
    field = instance_optimize(case["fixed"], case["moving"], InstanceOptimization(grid_factor=1),
                              progress=lambda done, total, loss: steps.append((done, total)))
    initial = _endpoint_error(torch.zeros_like(field), case)
    error = _endpoint_error(field, case)
    before, after = _dice(torch.zeros_like(field), case), _dice(field, case)
    print(f"max displacement {case['truth'].norm(dim=1).max():.2f}, endpoint error {initial:.2f} -> {error:.2f}"
          f" voxels, folding {_folding(field):.3f} %, Dice GM/WM {before.tolist()} -> {after.tolist()}")
    assert field.shape == (1, 3, *SHAPE)
    assert case["truth"].norm(dim=1).max() > 4  # displacements of up to 16 mm and more
    assert error < 0.5 * initial
    assert _folding(field) < 1.0
    assert torch.all(after > before + 0.08)
    assert steps[-1] == (3 * 80, 3 * 80) and len(steps) == 3 * 80


def test_refinement_from_a_good_start_improves_it(case):
    """From half the answer, refinement gets close to it (as close as MIND-SSC allows, see below)."""
    start = 0.5 * case["truth"]
    options = InstanceOptimization(grid_factor=1, iterations=40)
    field = instance_optimize(case["fixed"], case["moving"], options, init_field=start)
    before, after = _endpoint_error(start, case), _endpoint_error(field, case)
    print(f"endpoint error {before:.2f} -> {after:.2f} voxels")
    assert after < 0.6 * before
    assert torch.all(_dice(field, case) > _dice(start, case) + 0.02)
    # From the answer itself it drifts: warped MIND descriptors are not the descriptors of the warped
    # image, which at 4 mm costs about a quarter of a voxel (less than from half way, since only the
    # correction is penalised).
    exact = _endpoint_error(instance_optimize(case["fixed"], case["moving"], options, init_field=case["truth"]), case)
    print(f"from the answer: {exact:.2f} voxels")
    assert exact < min(0.35, after)


@pytest.mark.parametrize(("similarity", "iterations"), [("ncc", 15), ("mse", 30)])
def test_other_similarities_refine_too(case, similarity, iterations):
    """Local NCC and intensity MSE improve a half-way start as MIND-SSC does."""
    start = 0.5 * case["truth"]
    options = InstanceOptimization(similarity=similarity, grid_factor=1, iterations=iterations)
    field = instance_optimize(case["fixed"], case["moving"], options, init_field=start)
    assert _endpoint_error(field, case) < 0.6 * _endpoint_error(start, case)


def test_a_mask_limits_the_work_to_the_box_around_it(case):
    """With a mask on one hemisphere (x < 20) the field improves inside it, and only the box around the
    mask (4 voxels of margin: x < 24) is optimised, its edge values carried on beyond it."""
    hemisphere = case["brain"].clone()
    hemisphere[:, :, 20:] = False
    start = 0.5 * case["truth"]
    options = InstanceOptimization(grid_factor=1, iterations=40)
    field = instance_optimize(case["fixed"], case["moving"], options, init_field=start, fixed_mask=hemisphere)
    inside = {**case, "brain": hemisphere}
    assert _endpoint_error(field, inside) < 0.7 * _endpoint_error(start, inside)
    correction = field - start
    assert correction[:, :, 23].abs().max() > 0.1
    assert torch.allclose(correction[:, :, 24:], correction[:, :, 23:24].expand_as(correction[:, :, 24:]), atol=1e-5)


def test_refinement_keeps_an_exact_start(case):
    """With intensities, whose optimum is the answer, an exact start is kept; without steps it is returned."""
    options = InstanceOptimization(similarity="mse", grid_factor=1, iterations=40, regularization=0.03)
    field = instance_optimize(case["fixed"], case["moving"], options, init_field=case["truth"])
    assert _endpoint_error(field, case) < 0.25
    unchanged = instance_optimize(case["fixed"], case["moving"], InstanceOptimization(iterations=0),
                                  init_field=case["truth"])
    assert torch.allclose(unchanged, case["truth"], atol=1e-5)


def test_regularizing_the_correction_keeps_a_start_that_a_field_regularizer_shrinks(case):
    """From the exact answer, with intensities and a strong diffusion weight: penalising the whole field
    shrinks it away from the answer, penalising only the correction (the default when refining) keeps it."""
    errors = {}
    for correction in (False, True):
        options = InstanceOptimization(similarity="mse", iterations=40, regularization=3.0,
                                       regularize_correction=correction)
        field = instance_optimize(case["fixed"], case["moving"], options, init_field=case["truth"])
        errors[correction] = _endpoint_error(field, case)
    default = instance_optimize(case["fixed"], case["moving"], InstanceOptimization(similarity="mse", iterations=40,
                                regularization=3.0), init_field=case["truth"])
    print(f"endpoint error from the answer: whole field penalised {errors[False]:.3f}, correction "
          f"{errors[True]:.3f} voxels")
    assert errors[True] < 0.15 and errors[False] > 2 * errors[True]
    assert _endpoint_error(default, case) == pytest.approx(errors[True], abs=1e-6)


def _ball(shape, centre, radius: float) -> torch.Tensor:
    """A ``(1, 1, *shape)`` mask of the ball of ``radius`` voxels around ``centre``."""
    grid = spatial.identity_grid(shape)
    return ((grid - torch.tensor(centre).view(1, 3, 1, 1, 1)).norm(dim=1, keepdim=True) < radius).float()


def test_label_term_alone_aligns_the_labels():
    """On featureless images only the soft-Dice term acts: a ball shifted by (2, -1.5, 0) is followed."""
    shape, shift = (24, 24, 24), (2.0, -1.5, 0.0)
    fixed_ball = _ball(shape, (11.5, 11.5, 11.5), 6)
    moving_ball = _ball(shape, tuple(11.5 + s for s in shift), 6)
    flat = torch.zeros(1, 1, *shape)
    options = InstanceOptimization(similarity="mse", grid_factor=1, pyramid_levels=2, iterations=60)
    field = instance_optimize(flat, flat, options, fixed_labels=fixed_ball, moving_labels=moving_ball)
    inside = fixed_ball[0, 0].bool()
    mean = field[0][:, inside].mean(dim=1)
    assert torch.allclose(mean, torch.tensor(shift), atol=0.4), mean
    warped = (spatial.warp_one_hot(moving_ball, field) > 0.5).float()
    assert 2 * (warped * fixed_ball).sum() / (warped.sum() + fixed_ball.sum()) > 0.95


def test_keypoint_term_alone_recovers_a_shift():
    """On featureless images only the keypoint term acts: keypoints moved by a constant shift (in mm with
    anisotropic voxels) make the field that shift at the keypoints."""
    shape, shift = (20, 24, 16), torch.tensor([1.5, -2.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    fixed_points = 3 + torch.rand(40, 3, generator=generator) * (torch.tensor(shape) - 7)
    flat = torch.zeros(1, 1, *shape)
    options = InstanceOptimization(similarity="mse", grid_factor=1, pyramid_levels=2, iterations=60)
    field = instance_optimize(flat, flat, options, fixed_keypoints=fixed_points,
                              moving_keypoints=fixed_points + shift, spacing=(1.0, 1.5, 2.0))
    at_points = spatial.sample(field, fixed_points.T[None, :, :, None, None])[0, :, :, 0, 0].T
    assert torch.allclose(at_points, shift.expand_as(at_points), atol=0.25), (at_points - shift).abs().max()


def test_mask_restricts_the_similarity(smooth_volume):
    """The moving image differs from the fixed one only outside the mask: the field stays put with the
    mask and moves without it."""
    shape = (24, 24, 24)
    fixed = smooth_volume(shape, seed=3)
    moving = fixed.clone()
    shift = torch.tensor([1.5, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    moving[..., 14:] = spatial.warp(fixed, shift)[..., 14:]
    mask = torch.zeros_like(fixed)
    mask[..., :8] = 1  # MIND-SSC sees 3 voxels around each voxel: the mask stays clear of the change
    options = InstanceOptimization(grid_factor=1, pyramid_levels=1, iterations=40)
    masked = instance_optimize(fixed, moving, options, fixed_mask=mask)
    unmasked = instance_optimize(fixed, moving, options)
    assert masked[0, 0, :, :, 16:].mean().abs() < 0.1
    assert unmasked[0, 0, :, :, 16:].mean() < -1.0  # moving(x) = fixed(x + 1.5): the field is -1.5


def test_diffeomorphic_option_does_not_fold(case):
    """Barely regularised and unsmoothed, the additive field folds; the diffeomorphic one does not."""
    options = InstanceOptimization(pyramid_levels=2, iterations=40, regularization=0.02, smoothing=0)
    additive = instance_optimize(case["fixed"], case["moving"], options)
    options.diffeomorphic = True
    diffeomorphic = instance_optimize(case["fixed"], case["moving"], options)
    print(f"folding additive {_folding(additive):.3f} %, diffeomorphic {_folding(diffeomorphic):.3f} %")
    assert _folding(additive) > 0.1
    assert _folding(diffeomorphic) == 0.0
    assert _endpoint_error(diffeomorphic, case) < 0.7 * _endpoint_error(torch.zeros_like(diffeomorphic), case)


def test_options_are_checked():
    with pytest.raises(ValueError, match="similarity"):
        InstanceOptimization(similarity="cc")
    with pytest.raises(ValueError, match="grid_factor"):
        InstanceOptimization(grid_factor=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        InstanceOptimization(interpolation="cubic")
    with pytest.raises(ValueError, match="weights"):
        InstanceOptimization(regularization=-1.0)
    from_zero, refining = (InstanceOptimization(similarity="mse").resolved(r) for r in (False, True))
    assert (from_zero.iterations, from_zero.grid_factor, from_zero.regularize_correction) == (80, 2, False)
    assert from_zero.regularization == DEFAULT_REGULARIZATION["mse"]
    assert (refining.iterations, refining.grid_factor, refining.regularize_correction) == (20, 1, True)
    assert refining.regularization == REFINEMENT_REGULARIZATION["mse"]
    chosen = InstanceOptimization(iterations=5, grid_factor=2, regularization=0.0, regularize_correction=False)
    assert chosen.resolved(True) == chosen
    flat = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="both images"):
        instance_optimize(flat, flat, fixed_labels=torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="fixed grid"):
        instance_optimize(flat, flat, init_field=torch.zeros(1, 3, 8, 8, 7))
