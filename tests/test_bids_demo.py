"""The demo BIDS dataset (``rwcflow-demo-data``): valid BIDS names and NIfTI files, and ground truth that
reproduces the images (2 participants × 2 sessions at 4 mm, written through the command line)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from bids import BIDSLayout
from scipy import ndimage

from rwcflow import transforms
from rwcflow.bids_app import demo
from rwcflow.example import mni152_brain
from rwcflow.io import Grid, Image, load_image, resample
from rwcflow.maps import jacobian_from_world_field

SUBJECTS, SESSIONS = ["01", "02"], ["1", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "bids"
    assert demo.main([str(out), "--participants", "2", "--sessions", "2", "--resolution", "4", "--seed", "3"]) == 0
    return out


def _t1w(root, sub, ses):
    return root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz"


def _truth(root, sub):
    return json.loads((root / "sourcedata" / "truth" / f"sub-{sub}" / f"sub-{sub}_truth.json").read_text())


def test_pybids_finds_the_t1w_images_with_their_entities(dataset):
    layout = BIDSLayout(dataset, validate=True)
    images = layout.get(suffix="T1w", extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["session"]) for f in images) == [
        (sub, ses) for sub in SUBJECTS for ses in SESSIONS]
    assert layout.get_metadata(images[0].path)["SkullStripped"] is True
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert (description["BIDSVersion"], description["DatasetType"]) == ("1.9.0", "raw")
    assert description["License"] and description["Authors"] and "MNI ICBM152" in description["HowToAcknowledge"]
    rows = (dataset / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["participant_id", "seed"] and [r.split("\t")[0] for r in rows[1:]] == [
        "sub-01", "sub-02"]
    assert "Copyright (C) 1993-2009 Louis Collins" in (dataset / "README").read_text()


def test_every_file_passes_the_bids_validator(dataset):
    validator = pytest.importorskip("bids_validator").BIDSValidator()
    files = [f"/{path.relative_to(dataset).as_posix()}" for path in dataset.rglob("*") if path.is_file()]
    assert len(files) == 2 * 2 * 2 + 4 + 1 + 2 * 3  # images and sidecars, top level, template, truth
    assert all(validator.is_bids(name) for name in files), [name for name in files if not validator.is_bids(name)]
    assert not validator.is_bids("/sub-01/ses-1/anat/sub-01_T1w.nii.gz")  # the check can fail


def test_images_are_nifti_on_4mm_grids_near_mni_space(dataset):
    for sub in SUBJECTS:
        truth = _truth(dataset, sub)
        for ses in SESSIONS:
            img = nib.load(_t1w(dataset, sub, ses))
            assert img.ndim == 3 and max(img.shape) <= 48 and np.allclose(img.header.get_zooms(), 4.0)
            assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
            image = load_image(_t1w(dataset, sub, ses))
            assert image.data.min() >= 0 and image.data[0, 0, 0] == 0  # skull-stripped: zero background
            weights = image.data / image.data.sum()
            centre = (image.grid.world_points() * weights[..., None]).sum(axis=(0, 1, 2))
            assert np.linalg.norm(centre) < 35.0  # the brain's centre of mass, in MNI-like world mm
            hippocampus = truth["atrophy"]["sessions"][f"ses-{ses}"]["centre_mm"]
            # 8 mm deformation, a 5 mm shift and a 4 degree rotation move it at most about 20 mm
            assert np.linalg.norm(np.subtract(hippocampus, demo.LEFT_HIPPOCAMPUS_MNI_MM)) < 20.0


def test_the_true_field_maps_session_1_onto_session_2_up_to_the_noise(dataset):
    for sub in SUBJECTS:
        truth = _truth(dataset, sub)
        first, second = load_image(_t1w(dataset, sub, 1)), load_image(_t1w(dataset, sub, 2))
        ses2 = truth["atrophy"]["sessions"]["ses-2"]
        disp, grid = transforms.read_displacement_field(dataset / "sourcedata" / "truth" / f"sub-{sub}" / ses2["xfm"])
        assert grid == second.grid
        # session 1 sampled through the field as the demo samples it (cubic spline)
        voxels = first.grid.world_to_voxel(grid.world_points() + disp)
        predicted = ndimage.map_coordinates(first.data, np.moveaxis(voxels, -1, 0), order=3, mode="nearest")
        inside = ndimage.binary_erosion(predicted > 0.2 * np.percentile(predicted, 99))
        residual, sigma = (second.data - predicted)[inside], truth["noise_std"]
        # session 2 = session 1 (noise n1) sampled through the field + its own noise n2: the residual is
        # n2 - n1 on the same voxels away from the sphere, n2 - spline-interpolated n1 near it: of std sigma
        # * sqrt(2) or a little less
        assert abs(residual.mean()) < 0.05 * sigma
        assert 0.9 * np.sqrt(2) * sigma < residual.std() < 1.05 * np.sqrt(2) * sigma
        # world coordinates alone leave the repositioning: far more than the noise
        assert (second.data - resample(first, grid).data)[inside].std() > 2.5 * sigma
        # the atrophy is in the image: near the sphere, what the rigid repositioning alone leaves is
        # explained by the atrophy part of the prediction (regression slope about 1, 0 without it)
        rigid_only = resample(first, grid, world_matrix=np.linalg.inv(ses2["rigid_from_ses1_ras"])).data
        near = inside & (np.linalg.norm(grid.world_points() - ses2["centre_mm"], axis=-1) <= 24.0)
        atrophy, left = (predicted - rigid_only)[near], (second.data - rigid_only)[near]
        assert 0.6 < (atrophy * left).sum() / (atrophy * atrophy).sum() < 1.6


def test_the_true_volume_loss_is_the_fields_jacobian_over_the_sphere(dataset):
    for sub in SUBJECTS:
        atrophy = _truth(dataset, sub)["atrophy"]
        ses2 = atrophy["sessions"]["ses-2"]
        assert ses2["volume_change_percent"] == -5.0 and atrophy["sessions"]["ses-1"]["volume_change_percent"] == 0
        disp, grid = transforms.read_displacement_field(dataset / "sourcedata" / "truth" / f"sub-{sub}" / ses2["xfm"])
        jacobian = jacobian_from_world_field(disp, grid)
        distance = np.linalg.norm(grid.world_points() - ses2["centre_mm"], axis=-1)
        radius, spacing = atrophy["radius_mm"], grid.spacing.max()
        # the field maps session 2 to session 1: J = vol(ses-1) / vol(ses-2) = 1 / (1 - loss), exactly
        # where the central differences stay in the sphere (a uniform scaling there)
        interior = distance <= radius - spacing
        assert interior.sum() > 20 and np.allclose(jacobian[interior], 1 / 0.95, atol=1e-5)
        change = 100 * (np.exp(-np.log(jacobian[distance <= radius]).mean()) - 1)
        assert abs(change - ses2["volume_change_percent"]) < 0.3  # the rim's differences reach into the fade
        assert np.abs(np.log(jacobian[distance > 2 * radius + spacing])).max() < 1e-5  # rigid beyond the fade


def test_the_anatomy_field_maps_session_1_back_onto_the_template(dataset):
    template = load_image(dataset / "sourcedata" / "truth" / "tpl-MNI152NLin2009aSym_desc-brain_T1w.nii.gz")
    brain = template.data > 0.1 * template.data.max()
    for sub in SUBJECTS:
        disp, grid = transforms.read_displacement_field(
            dataset / "sourcedata" / "truth" / f"sub-{sub}" / _truth(dataset, sub)["anatomy"]["xfm"])
        first = load_image(_t1w(dataset, sub, 1))
        back = transforms.apply_displacement(first, disp, grid).data
        plain = resample(first, template.grid).data
        fit, unaligned = (np.corrcoef(image[brain], template.data[brain])[0, 1] for image in (back, plain))
        assert fit > 0.8 and fit > unaligned + 0.2


def test_shrink_sphere_is_a_uniform_scaling_inside_and_the_identity_far_away():
    grid = Grid((20, 20, 20), np.diag([2.0, 2.0, 2.0, 1.0]))
    centre = grid.voxel_to_world(np.array([10.0, 9.5, 10.0]))
    field = demo.shrink_sphere(grid, centre, 6.0, 0.1)[0].numpy()
    offset = np.indices(grid.shape) - np.array([10.0, 9.5, 10.0]).reshape(3, 1, 1, 1)
    distance = np.linalg.norm(offset, axis=0) * 2.0
    scale = 0.9 ** (-1 / 3) - 1
    assert np.allclose(field[:, distance <= 6.0], scale * offset[:, distance <= 6.0], atol=1e-6)
    assert np.abs(field[:, distance >= 12.0]).max() == 0
    with pytest.raises(ValueError):
        demo.shrink_sphere(grid, centre, 6.0, 1.0)


def test_cli_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "bids"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert demo.main([str(out), "--resolution", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rwcflow-demo-data: error: {out}: exists and is not empty"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bids"] and len(list(out.iterdir())) == 1
    assert demo.main([str(tmp_path / "new"), "--sessions", "3", "--atrophy", "60"]) == 2
    assert "not a volume loss" in capsys.readouterr().err and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as exit_info:
        demo.main([str(tmp_path / "new"), "--participants", "0"])
    assert exit_info.value.code == 2


def test_cli_fills_an_empty_folder_with_a_single_session_dataset(tmp_path, capsys):
    out = tmp_path / "bids"
    out.mkdir()
    assert demo.main([str(out), "--participants", "1", "--sessions", "1", "--resolution", "6"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 1 participant(s) x 1 session(s)")
    assert [path.name for path in tmp_path.iterdir()] == ["bids"]  # no staging folder left beside it
    assert sorted(path.name for path in (out / "sourcedata" / "truth" / "sub-01").iterdir()) == [
        "sub-01_ses-1_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz", "sub-01_truth.json"]
    assert list(_truth(out, "01")["atrophy"]["sessions"]) == ["ses-1"] and _t1w(out, "01", 1).is_file()


def _constant_image(grid: Grid, value: float) -> Image:
    return Image(np.full(grid.shape, value, dtype=np.float32), grid.affine)


def test_intensity_change_is_a_gain_times_a_linear_bias_field_of_the_given_size():
    grid = Grid((21, 15, 11), np.diag([2.0, 2.0, 2.0, 1.0]))
    data = demo.intensity_change(_constant_image(grid, 100.0), 0.1, np.random.default_rng(0)) / 100.0
    centre = tuple((n - 1) // 2 for n in grid.shape)
    gain = data[centre]  # the bias field is 1 at the grid's centre
    assert 0.9 <= gain <= 1.1
    bias = data / gain - 1.0
    # linear: no second differences along any axis, odd about the centre, ±0.1 at the far corners
    for axis in range(3):
        assert np.abs(np.diff(bias, n=2, axis=axis)).max() < 1e-5
    assert np.allclose(bias, -bias[::-1, ::-1, ::-1], atol=1e-5) and np.abs(bias).max() == pytest.approx(0.1, abs=1e-5)
    assert np.array_equal(demo.intensity_change(_constant_image(grid, 100.0), 0.0, np.random.default_rng(0)),
                          np.full(grid.shape, 100.0, dtype=np.float32))


def test_a_participant_of_another_brain_has_its_site_its_radius_and_a_changed_second_session():
    """The benchmark's participants (benchmarks/bench_longitudinal.py): any brain, site and radius; the
    later session with its own gain and bias field (session_intensity), the truth following them."""
    brain = mni152_brain(4.0)
    site = (26.0, 2.0, 0.0)
    plain = demo.make_participant("07", resolution_mm=4.0, seed=9, brain=brain, template="other", site="the right putamen",
                                  centre_mm=site, radius_mm=9.0)
    changed = demo.make_participant("07", resolution_mm=4.0, seed=9, brain=brain, template="other",
                                    site="the right putamen", centre_mm=site, radius_mm=9.0, session_intensity=0.1)
    atrophy = changed.truth["atrophy"]
    assert atrophy["region"] == "sphere around the right putamen" and atrophy["radius_mm"] == 9.0
    assert atrophy["centre_template_mm"] == list(site) and changed.truth["anatomy"]["xfm"].endswith("_to-other_mode-image_xfm.nii.gz")
    np.testing.assert_array_equal(plain.sessions[0].data, changed.sessions[0].data)  # session 1 untouched
    inside = plain.sessions[1].data > 0.2 * plain.sessions[1].data.max()
    ratio = changed.sessions[1].data[inside] / plain.sessions[1].data[inside]
    assert ratio.std() > 0.01 and 0.75 < ratio.min() and ratio.max() < 1.25  # gain and bias within (1 ± 0.1)²
