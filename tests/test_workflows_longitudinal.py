"""The longitudinal workflow, submitted for real with the "cf" worker: two sessions of one brain, the second
with a known local volume loss (a smooth radial contraction around a blob), and the single-session pass-through."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rwcflow import maps, spatial, transforms
from rwcflow.example import make_example_pair
from rwcflow.io import Image, load_image, resample, save_image
from rwcflow.workflows.longitudinal import Longitudinal

BLOB_CENTRE_MM = np.array([0.0, -10.0, 10.0])  # near the ventricles: local structure a registration can see
BLOB_SIGMA_MM = 16.0
STRENGTH = 0.4


def _contraction(image: Image) -> tuple[torch.Tensor, np.ndarray]:
    """Pull-back field ``u(x) = a w(x) (x - c)`` (voxels), ``w`` a Gaussian bump around the blob centre ``c``,
    and every voxel's distance to ``c`` in mm. ``session(x) = brain(x + u(x))`` shows the brain around ``c``
    shrunk by the factor ``1 / det(I + du/dx)``: strongly in the blob, fading outside."""
    centre = image.grid.world_to_voxel(BLOB_CENTRE_MM)
    offset = np.indices(image.grid.shape, dtype=np.float64) - centre.reshape(3, 1, 1, 1)
    distance = np.sqrt(((offset * image.grid.spacing.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
    bump = np.exp(-(distance**2) / (2 * BLOB_SIGMA_MM**2))
    return torch.from_numpy((STRENGTH * bump * offset)[None].astype(np.float32)), distance


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    brain = make_example_pair(resolution_mm=6.0).fixed
    field, distance = _contraction(brain)
    shrunk = spatial.warp(brain.tensor(), field)[0, 0].numpy().astype(np.float32)
    folder = tmp_path_factory.mktemp("sub-01")
    paths = [save_image(brain, folder / "ses-1_T1w.nii.gz"),
             save_image(brain.with_data(shrunk), folder / "ses-2_T1w.nii.gz")]
    true_log_change = -np.log(spatial.jacobian_determinant(field)[0, 0].numpy())  # log(vol ses-2 / vol ses-1)
    return paths, brain, distance, true_log_change


def test_local_volume_loss_is_recovered_by_an_unbiased_template(sessions, submit):
    """Rigid midspace (here the identity: ``affine=False``, the sessions share their grid) and the joint
    refinement recover the contraction, and split it between the sessions."""
    paths, brain, distance, true_log_change = sessions
    out = submit(Longitudinal(sessions=paths, affine=False, device="cpu"))
    template = load_image(out.template)
    assert template.grid == brain.grid
    assert len(out.xfms) == len(out.inverse_xfms) == len(out.warped) == len(out.log_jacobians) == 2
    assert [Path(path).name for path in out.xfms] == ["ses-1_T1w_xfm.nii.gz", "ses-2_T1w_xfm.nii.gz"]

    log_jacobians = [load_image(path).data for path in out.log_jacobians]
    jacobian = load_image(out.jacobians[1]).data
    np.testing.assert_allclose(np.log(np.maximum(jacobian, 1e-6)), log_jacobians[1], atol=1e-4)
    change = log_jacobians[1] - log_jacobians[0]
    blob = distance <= BLOB_SIGMA_MM
    brain_mask = brain.data > 0.1 * brain.data.max()
    far = brain_mask & (distance >= 4 * BLOB_SIGMA_MM)
    expected = true_log_change[blob].mean()
    assert expected < -0.4  # the simulated loss is large: ~45 % of the blob's volume
    # shrinkage, of roughly the simulated size (a 6 mm grid smooths a blob of ~3 voxels radius)
    assert 0.3 * expected > change[blob].mean() > 1.5 * expected
    # ~no change far from the blob, where the simulated field is the identity (the registration spreads a
    # small compensating expansion over the brain: ~0.07 here, against -0.33 in the blob)
    assert np.abs(true_log_change[far]).max() < 0.01
    assert abs(change[far].mean()) < 0.15 * abs(expected)

    # the template lies between the sessions: both move by comparable amounts in the blob, neither ~0
    magnitudes = [np.linalg.norm(transforms.read_displacement_field(path)[0], axis=-1)[blob].mean()
                  for path in out.xfms]
    assert min(magnitudes) > 0.5  # mm
    assert 0.5 < magnitudes[0] / magnitudes[1] < 2.0

    # the inverse undoes the forward field, and the warped sessions lie on the template
    for xfm, inverse, warped in zip(out.xfms, out.inverse_xfms, out.warped):
        forward = transforms.read_displacement_field(xfm)[0]
        backward, grid = transforms.read_displacement_field(inverse)
        assert grid == template.grid
        assert np.abs(forward[blob] + backward[blob]).mean() < 0.5 * np.abs(forward[blob]).mean()
        warped_data = load_image(warped).data
        error = np.abs(warped_data - template.data)[brain_mask].mean()
        assert error < 0.1 * template.data[brain_mask].mean()

    # the groupwise refinement brings the sessions closer than their rigid midspace alone does
    unrefined = submit(Longitudinal(sessions=paths, affine=False, device="cpu", refine_iters=0))

    def mismatch(outputs) -> float:
        first, second = (load_image(path).data for path in outputs.warped)
        return float(np.abs(first - second)[blob].mean())

    assert mismatch(out) < 0.7 * mismatch(unrefined)


def test_sessions_are_carried_into_a_group_template(sessions, tmp_path, submit):
    """The group template is the first session moved 6 mm in world space: the composed transforms carry
    both sessions onto it, and equal the composition of the two registrations' fields."""
    paths, brain, distance, _ = sessions
    shifted = brain.affine.copy()
    shifted[:3, 3] += [6.0, -6.0, 0.0]
    group = save_image(Image(brain.data, shifted), tmp_path / "tpl-group_T1w.nii.gz")
    out = submit(Longitudinal(sessions=paths, refine_iters=20, model="none", io_iters=20, affine=True,
                              device="cpu", group_template=group))
    group_grid = load_image(group).grid
    assert len(out.group_xfms) == len(out.group_warped) == 2
    assert [Path(path).name for path in out.group_xfms] == ["ses-1_T1w_xfm_composed.nii.gz",
                                                            "ses-2_T1w_xfm_composed.nii.gz"]
    to_group, grid = transforms.read_displacement_field(out.group_xfm)
    assert grid == group_grid
    # far from the blob both sessions are the brain: there the mapping is the 6 mm shift
    far = (distance >= 4 * BLOB_SIGMA_MM) & (brain.data > 0.1 * brain.data.max())
    for session_xfm, xfm, warped in zip(out.xfms, out.group_xfms, out.group_warped):
        disp, grid = transforms.read_displacement_field(xfm)
        assert grid == group_grid
        expected = maps.compose_displacements([transforms.read_displacement_field(session_xfm),
                                               (to_group, grid)], grid)
        np.testing.assert_allclose(disp, expected, atol=1e-4)
        np.testing.assert_allclose(np.median(disp[far], axis=0), [-6.0, 6.0, 0.0], atol=1.0)
        moved = load_image(warped)
        assert moved.grid == group_grid
        # closer to the group template than the session merely resampled onto its grid (1 voxel off)
        unaligned = resample(load_image(paths[0]), group_grid).data
        fit, before = (np.corrcoef(data[far], brain.data[far])[0, 1] for data in (moved.data, unaligned))
        assert fit > before + 0.3


def test_single_session_passes_through(sessions, submit, caplog):
    paths, brain, _, _ = sessions
    with caplog.at_level("WARNING", logger="rwcflow"):
        out = submit(Longitudinal(sessions=paths[:1], model="none", io_iters=5, device="cpu"))
    assert "a single session" in caplog.text and "ses-1_T1w" in caplog.text
    assert out.group_xfms is None
    np.testing.assert_array_equal(load_image(out.template).data, brain.data)
    disp, grid = transforms.read_displacement_field(out.xfms[0])
    assert grid == brain.grid
    np.testing.assert_array_equal(disp, 0.0)
    np.testing.assert_array_equal(load_image(out.warped[0]).data, brain.data)
    np.testing.assert_allclose(load_image(out.jacobians[0]).data, 1.0, atol=1e-6)
    # (read with nibabel: rwcflow's load_image refuses an all-zero image)
    np.testing.assert_allclose(nib.load(out.log_jacobians[0]).get_fdata(), 0.0, atol=1e-6)


@pytest.mark.parametrize(("arguments", "message"), [({"sessions": []}, "at least one session"),
                                                     ({"refine_iters": -1}, "refine_iters must be")])
def test_invalid_arguments_are_refused(sessions, submit, arguments, message):
    with pytest.raises(ValueError, match=message):
        submit(Longitudinal(**{"sessions": sessions[0], **arguments}))
