"""Pairwise and Atlas workflows (and the ShapeUpdate / LabelProbabilities tasks they use), submitted for
real with the "cf" worker on subjects made by known smooth deformations of one small brain."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rwcflow import maps, spatial, transforms
from rwcflow.example import mni152_brain
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.synth import random_smooth_field
from rwcflow.tasks import FollowUpdate, LabelProbabilities, Register, ShapeUpdate
from rwcflow.workflows.atlas import Atlas
from rwcflow.workflows.pairwise import Pairwise

SUBJECTS = 4


def _data(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The "true" brain (4 mm, 39×47×41) and subjects made from it by smooth brain→subject maps of zero
    mean (up to 16 mm), so the true brain is their unbiased mean shape in ANTs' sense; each subject is
    the brain pulled back through the inverse map, and ``inverses`` (subject→brain, voxels) are kept."""
    folder = tmp_path_factory.mktemp("cohort")
    brain, labels = mni152_brain(4.0)
    fields = torch.cat([random_smooth_field(brain.data.shape, 16.0 / 4.0, seed=seed) for seed in range(SUBJECTS)])
    fields = fields - fields.mean(dim=0, keepdim=True)
    inverses = torch.cat([spatial.invert_field(field[None]) for field in fields])
    images, label_maps = [], []
    for n, inverse in enumerate(inverses):
        warped = spatial.warp(brain.tensor(), inverse[None])[0, 0].numpy()
        warped_labels = spatial.warp_labels(labels.tensor(dtype=torch.int32), inverse[None])[0, 0].numpy()
        images.append(save_image(brain.with_data(warped), folder / f"sub-{n}_T1w.nii.gz"))
        label_maps.append(save_image(labels.with_data(warped_labels.astype(np.int32)), folder / f"sub-{n}_dseg.nii.gz"))
    return {"brain": brain, "labels": labels, "images": images, "label_maps": label_maps, "inverses": inverses}


def _correlation(image, brain: Image) -> float:
    """Pearson correlation with the true brain inside it."""
    inside = brain.data > 0
    return float(np.corrcoef(load_image(image).data[inside], brain.data[inside])[0, 1])


def _mean_shape_error(xfms: list, cohort) -> float:
    """Mean distance (mm, inside the brain) between a template's points and the true brain points they
    stand for, averaged over subjects: template point ``p`` goes to subject point ``p + d_n(p)`` by the
    registration ``xfms[n]`` and on to the brain by the known subject→brain map. 0 for a template with
    the brain's shape."""
    brain = cohort["brain"]
    grid = brain.grid
    points = grid.world_points()
    total = np.zeros_like(points)
    for xfm, inverse in zip(xfms, cohort["inverses"]):
        disp, xfm_grid = transforms.read_displacement_field(xfm)
        assert xfm_grid == grid
        subject_voxels = torch.from_numpy(grid.world_to_voxel(points + disp)).float().permute(3, 0, 1, 2)[None]
        to_brain = spatial.sample(inverse[None], subject_voxels)[0].permute(1, 2, 3, 0).numpy()
        total += grid.voxel_to_world(subject_voxels[0].permute(1, 2, 3, 0).numpy() + to_brain)
    error = np.linalg.norm(total / len(xfms) - points, axis=-1)
    return float(error[brain.data > 0].mean())


def test_pairwise_equals_register_task(cohort, submit):
    images, label_maps = cohort["images"], cohort["label_maps"]
    inputs = dict(fixed=images[0], moving=images[1], model="none", io_iters=20, device="cpu",
                  fixed_labels=label_maps[0], moving_labels=label_maps[1])
    out = submit(Pairwise(**inputs))
    direct = submit(Register(**inputs))
    np.testing.assert_allclose(_data(out.warped), _data(direct.warped), atol=1e-6)
    np.testing.assert_array_equal(_data(out.warped_labels), _data(direct.warped_labels))
    np.testing.assert_allclose(_data(out.xfm), _data(direct.xfm), atol=1e-6)
    np.testing.assert_allclose(transforms.read_affine(out.affine), transforms.read_affine(direct.affine), atol=1e-12)
    assert json.loads(Path(out.metrics).read_text()) == json.loads(Path(direct.metrics).read_text())
    disp, grid = transforms.read_displacement_field(out.xfm)
    jacobian = load_image(out.jacobian)
    assert jacobian.grid == grid
    np.testing.assert_allclose(jacobian.data, maps.jacobian_from_world_field(disp, grid), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_data(out.log_jacobian), maps.log_jacobian(jacobian.data), atol=1e-5)

    unlabelled = submit(Pairwise(fixed=images[0], moving=images[1], model="none", io_iters=0, device="cpu"))
    assert unlabelled.warped_labels is None and unlabelled.metrics is None


def test_shape_update_moves_the_average_against_a_translation(tmp_path, submit):
    """A ramp ``f(p) = a·p + b`` and a constant mean field ``t``: 4 steps of ``-t/4`` give ``f(p - t)``."""
    grid = Grid((16, 14, 12), np.diag([2.0, 1.5, 2.5, 1.0]))
    slope, offset, shift = np.array([0.5, -0.25, 0.75]), 40.0, np.array([1.0, -1.5, 2.0])
    points = grid.world_points()
    average = save_image(Image((points @ slope + offset).astype(np.float32), grid.affine), tmp_path / "avg.nii.gz")
    xfm = transforms.write_displacement_field(tmp_path / "mean_xfm.nii.gz", np.broadcast_to(shift, (*grid.shape, 3)), grid)
    first = submit(ShapeUpdate(average=average, average_xfm=xfm, gradient_step=0.25, template=average))
    template = load_image(first.template)
    assert template.grid == grid
    inside = np.all((grid.world_to_voxel(points - shift) >= 0) & (grid.world_to_voxel(points - shift) <= np.array(grid.shape) - 1), axis=-1)
    np.testing.assert_allclose(template.data[inside], ((points - shift) @ slope + offset)[inside], atol=1e-3)
    # the update itself: the new template's point p is the average's p - t
    update, update_grid = transforms.read_displacement_field(first.update_xfm)
    assert update_grid == grid and Path(first.update_xfm).name == "template_update-1_xfm.nii.gz"
    np.testing.assert_allclose(update[inside], np.broadcast_to(-shift, update.shape)[inside], atol=1e-5)

    # the log grows by one entry per update and records the mean field length
    second = submit(ShapeUpdate(average=average, average_xfm=xfm, gradient_step=0.5, repeats=1, log=first.log,
                                template=first.template, templates=first.templates))
    log = json.loads(Path(second.log).read_text())
    assert [entry["update"] for entry in log] == [1, 2]
    assert log[0]["update_norm_mm"] == pytest.approx(np.linalg.norm(shift), rel=1e-5)
    assert log[0]["update_norm_grid_mm"] == pytest.approx(np.linalg.norm(shift), rel=1e-5)
    # the templates registered to, in order: the one the first update started from, then its result
    assert [Path(path).name for path in second.templates] == ["avg.nii.gz", "template_update-1.nii.gz"]
    half = load_image(second.template)
    np.testing.assert_allclose(half.data[inside], ((points - shift / 2) @ slope + offset)[inside], atol=1e-3)


def test_follow_update_composes_the_update_before_the_registration(tmp_path, submit):
    """A registration to the previous template translating by ``a`` (previous template point q to the
    image's q + a) and an update translating by ``b`` (new template point p to the previous template's
    p + b): the image's map from the new template is p + b + a, its image sampled there once, labels too."""
    grid = Grid((16, 14, 12), np.diag([2.0, 1.5, 2.5, 1.0]))
    slope, offset, a, b = np.array([0.5, -0.25, 0.75]), 40.0, np.array([1.0, -1.5, 2.0]), np.array([-0.5, 2.0, 1.0])
    points = grid.world_points()
    moving = save_image(Image((points @ slope + offset).astype(np.float32), grid.affine), tmp_path / "sub-7_T1w.nii.gz")
    labels = save_image(Image((points[..., 0] > 5.0).astype(np.int32), grid.affine), tmp_path / "sub-7_dseg.nii.gz")
    xfm = transforms.write_displacement_field(tmp_path / "xfm.nii.gz", np.broadcast_to(a, (*grid.shape, 3)), grid)
    update = transforms.write_displacement_field(tmp_path / "update.nii.gz", np.broadcast_to(b, (*grid.shape, 3)), grid)
    out = submit(FollowUpdate(moving=moving, xfm=xfm, update_xfm=update, moving_labels=labels))
    assert [Path(path).name for path in (out.xfm, out.warped, out.warped_labels)] == [
        "sub-7_T1w_xfm.nii.gz", "sub-7_T1w_warped.nii.gz", "sub-7_T1w_warped_labels.nii.gz"]
    composed, composed_grid = transforms.read_displacement_field(out.xfm)
    assert composed_grid == grid
    mapped = points + a + b

    def on_grid(world: np.ndarray) -> np.ndarray:
        voxels = grid.world_to_voxel(world)
        return np.all((voxels >= 0) & (voxels <= np.array(grid.shape) - 1), axis=-1)

    inside = on_grid(points + b) & on_grid(mapped)  # the registration's field is read at p + b
    assert inside.mean() > 0.4
    np.testing.assert_allclose(composed[inside], np.broadcast_to(a + b, composed.shape)[inside], atol=1e-5)
    np.testing.assert_allclose(load_image(out.warped).data[inside], (mapped @ slope + offset)[inside], atol=1e-3)
    warped_labels = load_image(out.warped_labels, labels=True).data
    np.testing.assert_array_equal(warped_labels[inside & (np.abs(mapped[..., 0] - 5.0) > 1.0)],
                                  (mapped[..., 0] > 5.0)[inside & (np.abs(mapped[..., 0] - 5.0) > 1.0)])


def test_label_probabilities(tmp_path, submit):
    grid = Grid((4, 3, 2), np.eye(4))
    maps_ = [np.zeros(grid.shape, np.int32) for _ in range(4)]
    for n, labels in enumerate(maps_):
        labels[: n + 1] = 3
        labels[3, 0, 0] = 7
    paths = [save_image(Image(m, grid.affine), tmp_path / f"l{n}.nii.gz") for n, m in enumerate(maps_)]
    out = submit(LabelProbabilities(label_maps=paths))
    assert out.label_values == [3, 7]
    probabilities = _data(out.probabilities)
    assert probabilities.shape == (*grid.shape, 2)
    np.testing.assert_allclose(probabilities[:, 1, 1, 0], [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(probabilities[3, 0, 0], [0.0, 1.0])
    np.testing.assert_allclose(probabilities[..., 1].sum(), 1.0)


def test_atlas_is_closer_to_the_true_brain_than_the_plain_average(cohort, submit):
    brain, images = cohort["brain"], cohort["images"]
    options = dict(model="none", io_iters=40, affine=False, device="cpu")
    out = submit(Atlas(images=images, iterations=3, labels=cohort["label_maps"], **options))
    template = load_image(out.template)
    assert template.grid == brain.grid and np.isfinite(template.data).all()

    # templates[0] is the plain average of the inputs; every update brings the template closer to the brain
    assert [Path(path).name for path in out.templates[1:]] == ["template_update-1.nii.gz", "template_update-2.nii.gz"]
    assert Path(out.template).name == "template_update-3.nii.gz"
    correlations = [_correlation(path, brain) for path in [*out.templates, out.template]]
    assert correlations[1] > correlations[0] + 0.01
    assert correlations[-1] > correlations[1]
    # its shape is closer to the brain's than the plain average's is, as close as the brain's own (the
    # registrations' errors at 4 mm, ~0.6 mm, are the floor of this measure)
    def shape_error_of(template) -> float:
        registrations = submit(Register(fixed=template, **options).split(moving=images).combine("moving"))
        return _mean_shape_error(registrations.xfm, cohort)

    error = _mean_shape_error(out.xfms, cohort)
    true_brain = save_image(brain, Path(out.template).parent.parent / "true_brain.nii.gz")
    assert error < shape_error_of(out.templates[0])
    assert error < 1.05 * shape_error_of(true_brain)

    # the shape update shrinks: the mean template->subject field falls
    log = json.loads(Path(out.log).read_text())
    assert [entry["update"] for entry in log] == [1, 2, 3]
    assert log[-1]["update_norm_mm"] < log[0]["update_norm_mm"]

    assert len(out.xfms) == len(out.warped) == SUBJECTS
    # each registration's files are named after its subject, so none is renamed when collected
    for n, (xfm, warped) in enumerate(zip(out.xfms, out.warped)):
        assert Path(xfm).name == f"sub-{n}_T1w_xfm.nii.gz" and Path(warped).name == f"sub-{n}_T1w_warped.nii.gz"
        assert nib.load(warped).shape == brain.grid.shape

    probabilities = _data(out.label_probabilities)
    assert probabilities.shape == (*brain.grid.shape, len(out.label_values))
    assert out.label_values == [1, 2, 3]
    assert probabilities.min() >= 0 and probabilities.sum(axis=-1).max() <= 1 + 1e-6
    # each tissue is the likelier label where the true brain has it
    for n, value in enumerate(out.label_values):
        assert probabilities[..., n][cohort["labels"].data == value].mean() > 0.5


def test_atlas_rejects_bad_inputs(cohort, submit):
    with pytest.raises(Exception, match="iterations must be at least 1"):
        submit(Atlas(images=cohort["images"], iterations=0, model="none", io_iters=0, device="cpu"))
