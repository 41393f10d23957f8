"""Pair sources: Learn2Reg dataset.json (OASIS-like and NLST-like), BIDS (inter / intra-subject, derivatives),
synthetic pairs from offline anatomy, on small generated examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from rwcflow import spatial
from rwcflow.anatomy import Anatomy, available_anatomies, brain_grid, load_anatomy
from rwcflow.datasets import (
    BIDSSource,
    Learn2RegSource,
    StepPairs,
    SyntheticSource,
    concatenate,
    make_source,
    working_grid,
)
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, save_image
from rwcflow.synth import SynthOptions

SHAPE = (12, 10, 8)


def _ramp(grid: Grid, slope=(1.0, 2.0, -0.5), offset=40.0) -> np.ndarray:
    """A linear function of world position: resampling it in world space is exact."""
    return (grid.world_points() @ np.asarray(slope) + offset).astype(np.float32)


def _world_labels(grid: Grid) -> np.ndarray:
    """Boxes at fixed world positions (mm): labels 3 and 7 land on whole voxels of integer-offset grids."""
    x, y, z = np.moveaxis(grid.world_points(), -1, 0)
    labels = np.where((x >= 2) & (x < 8) & (y >= 2) & (y < 8) & (z >= 3) & (z < 6), 3, 0)
    return np.where((x >= 4) & (x < 6) & (y >= 3) & (y < 5) & (z >= 3) & (z < 5), 7, labels).astype(np.int16)


def _labels(shape=SHAPE, shift=0) -> np.ndarray:
    labels = np.zeros(shape, np.int16)
    labels[2 + shift:8 + shift, 2:8, 2:6] = 3
    labels[4:6, 3:5, 3:5] = 7
    return labels


# --- Learn2Reg ---------------------------------------------------------------------------------------


@pytest.fixture
def oasis(tmp_path):
    """An OASIS-like dataset: four MR images with labels and masks, unpaired, one validation pair."""
    root = tmp_path / "OASIS"
    grid = Grid(SHAPE, np.diag([1.0, 1.0, 1.0, 1.0]))
    training = []
    for n in range(4):
        name = f"OASIS_{n:04d}_0000.nii.gz"
        save_image(Image(_ramp(grid) + 10 * n, grid.affine), root / "imagesTr" / name)
        save_image(Image(_labels(shift=n % 2), grid.affine), root / "labelsTr" / name)
        save_image(Image(np.ones(SHAPE, np.uint8), grid.affine), root / "masksTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "mask": f"./masksTr/{name}"})
    info = {"name": "OASIS", "modality": {"0": "MR"}, "training": training, "training_paired_images": [],
            "registration_val": [{"fixed": "./imagesTr/OASIS_0003_0000.nii.gz", "moving": "./imagesTr/OASIS_0002_0000.nii.gz"}]}
    (root / "OASIS_dataset.json").write_text(json.dumps(info))
    return root / "OASIS_dataset.json"


@pytest.fixture
def nlst(tmp_path):
    """An NLST-like dataset: CT pairs (HU) with keypoint CSVs (voxel coordinates) found by folder name."""
    root = tmp_path / "NLST"
    grid = Grid(SHAPE, np.diag([1.5, 1.5, 2.0, 1.0]))
    training, paired = [], []
    for case in range(2):
        for phase in range(2):
            name = f"NLST_{case:04d}_{phase:04d}.nii.gz"
            hu = np.full(SHAPE, -1000.0, np.float32)
            hu[3:9, 2:8, 2:6] = 200.0 * phase - 100.0
            hu[0, 0, 0] = 3000.0  # clipped by the window
            save_image(Image(hu, grid.affine), root / "imagesTr" / name)
            save_image(Image((hu > -1000).astype(np.uint8), grid.affine), root / "masksTr" / name)
            points = np.array([[3.0, 4.0, 2.0], [6.0, 5.0, 4.0]]) + phase * np.array([1.0, 0.0, 0.5])
            (root / "keypointsTr").mkdir(parents=True, exist_ok=True)
            np.savetxt(root / "keypointsTr" / name.replace(".nii.gz", ".csv"), points, delimiter=",")
            training.append({"image": f"./imagesTr/{name}"})
        paired.append({"fixed": f"./imagesTr/NLST_{case:04d}_0000.nii.gz", "moving": f"./imagesTr/NLST_{case:04d}_0001.nii.gz"})
    info = {"name": "NLST", "modality": {"0": "CT", "1": "CT"}, "training": training,
            "training_paired_images": paired[:1], "registration_val": paired[1:]}
    (root / "NLST_dataset.json").write_text(json.dumps(info))
    return root / "NLST_dataset.json"


def test_learn2reg_unpaired_dataset_gives_random_pairs_outside_validation(oasis):
    source = Learn2RegSource(oasis)
    seen = set()
    for seed in range(12):
        pair = source.sample(torch.Generator().manual_seed(seed))
        fixed_name, moving_name = pair.name.split("<-")
        assert fixed_name != moving_name
        seen |= {fixed_name, moving_name}
        assert pair.fixed.shape == pair.moving.shape == (1, 1, *SHAPE)
        assert 0 <= pair.fixed.min() and pair.fixed.max() <= 1
        assert pair.fixed_labels.dtype == torch.int64 and set(pair.fixed_labels.unique().tolist()) == {0, 3, 7}
        assert pair.fixed_mask is not None and pair.fixed_keypoints is None
    assert seen == {"OASIS_0000_0000.nii.gz", "OASIS_0001_0000.nii.gz"}  # 2 and 3 are the validation pair
    (val,) = source.validation()
    assert val.name == "OASIS_0003_0000.nii.gz<-OASIS_0002_0000.nii.gz"
    assert not torch.equal(val.fixed_labels, val.moving_labels)


def test_learn2reg_paired_ct_dataset_with_keypoints(nlst):
    source = Learn2RegSource(nlst)
    assert source.modality == "ct"
    pair = source.sample(torch.Generator().manual_seed(0))
    assert pair.name == "NLST_0000_0000.nii.gz<-NLST_0000_0001.nii.gz"
    assert pair.spacing == (1.5, 1.5, 2.0)
    # the window [-1000, 1000] HU maps to [0, 1]: -1000 -> 0, -100 -> 0.45, 100 -> 0.55, 3000 clipped to 1
    assert pair.fixed[0, 0, 1, 1, 1] == 0 and pair.fixed[0, 0, 0, 0, 0] == 1
    assert pair.fixed[0, 0, 5, 5, 3].item() == pytest.approx(0.45)
    assert pair.moving[0, 0, 5, 5, 3].item() == pytest.approx(0.55)
    np.testing.assert_allclose(pair.fixed_keypoints.numpy(), [[3, 4, 2], [6, 5, 4]], atol=1e-5)
    np.testing.assert_allclose(pair.moving_keypoints.numpy(), [[4, 4, 2.5], [7, 5, 4.5]], atol=1e-5)
    assert pair.fixed_mask.sum() == 6 * 6 * 4 + 1

    (val,) = source.validation()
    assert val.name.startswith("NLST_0001_0000")
    # resized to 3 mm voxels: keypoints follow to the new voxel coordinates
    coarse = Learn2RegSource(nlst, resolution_mm=3.0).sample(torch.Generator().manual_seed(0))
    grid = working_grid(Grid(SHAPE, np.diag([1.5, 1.5, 2.0, 1.0])), 3.0)
    assert coarse.fixed.shape[2:] == grid.shape
    expected = grid.world_to_voxel(Grid(SHAPE, np.diag([1.5, 1.5, 2.0, 1.0])).voxel_to_world(np.array([[3.0, 4, 2]])))
    np.testing.assert_allclose(coarse.fixed_keypoints[:1].numpy(), expected, atol=1e-5)


def test_learn2reg_errors_name_the_file(tmp_path, oasis):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="broken.json"):
        Learn2RegSource(bad)
    info = json.loads(oasis.read_text())
    info["training"] = info["training"][2:]
    lonely = oasis.parent / "lonely.json"
    lonely.write_text(json.dumps(info))
    with pytest.raises(InputError, match="two or more training images"):
        Learn2RegSource(lonely)


# --- BIDS --------------------------------------------------------------------------------------------


@pytest.fixture
def bids(tmp_path):
    """Three subjects with two sessions each, on different grids; dseg labels (native space, plus a
    template-space one to ignore), a brain mask, and FreeSurfer's aseg for one subject."""
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.8.0"}')
    for n, subject in enumerate(("01", "02", "03")):
        for session in ("1", "2"):
            affine = np.diag([1.0, 1.0, 1.0, 1.0])
            affine[:3, 3] = [n - 1.0, -n, -2.0 * (session == "2")]
            grid = Grid(SHAPE, affine)
            stem = f"sub-{subject}_ses-{session}"
            save_image(Image(_ramp(grid), affine), root / f"sub-{subject}" / f"ses-{session}" / "anat" / f"{stem}_T1w.nii.gz")
            anat = root / "derivatives" / "prep" / f"sub-{subject}" / f"ses-{session}" / "anat"
            if subject != "03":
                save_image(Image(_world_labels(grid), affine), anat / f"{stem}_desc-aseg_dseg.nii.gz")
                save_image(Image(np.full(SHAPE, 9, np.int16), affine), anat / f"{stem}_space-MNI152NLin2009cAsym_dseg.nii.gz")
                mask = np.zeros(SHAPE, np.uint8)
                mask[1:-1, 1:-1, 1:-1] = 1
                save_image(Image(mask, affine), anat / f"{stem}_desc-brain_mask.nii.gz")
            else:
                fs = root / "derivatives" / "freesurfer" / stem / "mri"
                save_image(Image(_world_labels(grid).astype(np.int32), affine), fs / "aseg.mgz")
    return root


def test_bids_inter_subject_pairs_resample_the_moving_image_in_world_space(bids):
    source = BIDSSource(bids, pairing="inter", validation_subjects=1)
    for seed in range(6):
        pair = source.sample(torch.Generator().manual_seed(seed))
        fixed_name, moving_name = pair.name.split("<-")
        assert fixed_name[:6] != moving_name[:6] and "sub-03" not in pair.name  # sub-03 is held out
        assert pair.fixed_labels is not None and set(pair.fixed_labels.unique().tolist()) <= {0, 3, 7}
        assert 9 not in pair.moving_labels.unique().tolist()  # the template-space dseg is not used
        inside = pair.fixed_mask[0, 0] > 0
        assert (pair.fixed[0, 0][~inside] == 0).all()  # skull-stripped by the brain mask
    # the boxes lie at the same world position in every image: resampled in world space, they coincide
        assert torch.equal(pair.moving_labels, pair.fixed_labels)
        assert (pair.fixed_labels == 3).sum() == 6 * 6 * 3 - 2 * 2 * 2

    validation = BIDSSource(bids, pairing="inter", validation_subjects=1, validation_pairs=3).validation()
    assert len(validation) == 3 and all(pair.name.startswith("sub-03") for pair in validation)


def test_bids_intra_subject_pairs_and_freesurfer_labels(bids):
    source = BIDSSource(bids, pairing="intra", validation_subjects=0)
    names = {source.sample(torch.Generator().manual_seed(seed)).name for seed in range(20)}
    assert all(name.split("<-")[0][:6] == name.split("<-")[1][:6] for name in names)
    assert any(name.startswith("sub-03") for name in names)
    sub03 = next(pair for pair in (source._load(*p) for p in source.train_pairs) if pair.name.startswith("sub-03"))
    assert set(sub03.fixed_labels.unique().tolist()) == {0, 3, 7}  # from derivatives/freesurfer/.../aseg.mgz
    assert torch.equal(sub03.moving_labels, sub03.fixed_labels) and sub03.fixed_mask is None
    assert not torch.equal(sub03.moving, sub03.fixed)  # the grids differ by 2 mm: the images were resampled


def test_bids_errors(tmp_path, bids):
    with pytest.raises(InputError, match="no sub-"):
        BIDSSource(tmp_path)
    with pytest.raises(InputError, match="too few subjects"):
        BIDSSource(bids, validation_subjects=2)
    for path in bids.glob("sub-*/ses-2/anat/*_T1w.nii.gz"):
        path.unlink()
    with pytest.raises(InputError, match="no intra-subject training pair"):
        BIDSSource(bids, pairing="intra", validation_subjects=0)
    with pytest.raises(ValueError, match="pairing"):
        BIDSSource(bids, pairing="cross")


# --- synthetic and anatomy ------------------------------------------------------------------------------


def test_brain_grid_covers_the_labels_in_ras():
    labels = np.zeros((20, 20, 20), np.int32)
    labels[5:10, 3:15, 8:9] = 1
    affine = np.array([[-2.0, 0, 0, 30], [0, 0, 2, -10], [0, -2, 0, 20], [0, 0, 0, 1]])  # LIA
    grid = brain_grid(Image(labels, affine), 4.0, margin_mm=2.0)
    assert np.allclose(grid.affine[:3, :3], 4 * np.eye(3))
    corners = Grid(labels.shape, affine).voxel_to_world(np.array([[5.0, 3, 8], [9, 14, 8]]))
    low, high = corners.min(0) - 2, corners.max(0) + 2
    np.testing.assert_allclose(grid.affine[:3, 3], low)
    assert np.all(grid.voxel_to_world(np.array(grid.shape, float) - 1) <= high + 1e-9)
    assert np.all(grid.voxel_to_world(np.array(grid.shape, float) - 1) > high - 4)


def test_mni152_anatomy_is_always_available():
    assert "mni152" in available_anatomies()
    anatomy = load_anatomy("mni152", 8.0)
    assert anatomy.image.grid == anatomy.labels.grid
    assert set(np.unique(anatomy.labels.data)) == {0, 1, 2, 3}
    assert anatomy.image.data.min() == 0 and anatomy.image.data.max() == pytest.approx(1.0)
    with pytest.raises(InputError, match="unknown anatomy"):
        load_anatomy("colin27", 8.0)


def _toy_anatomy() -> Anatomy:
    grid = Grid((20, 18, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    labels = np.zeros(grid.shape, np.int32)
    labels[3:17, 3:15, 3:13] = 1
    labels[7:12, 6:12, 5:10] = 2
    i, j, k = np.indices(grid.shape)
    texture = (labels > 0) * (0.5 + 0.25 * np.sin(i / 3.0) + 0.25 * np.cos(j / 4.0 + k / 5.0))
    return Anatomy("toy", Image(texture.astype(np.float32), grid.affine), Image(labels, grid.affine))


def test_synthetic_source_pairs_know_their_field():
    options = SynthOptions(max_displacement=6.0, gamma=0, bias=0, blur=0, noise=0, real_intensity=1.0)
    source = SyntheticSource([_toy_anatomy()], options=options, validation_pairs=2)
    pair = source.sample(torch.Generator().manual_seed(2))  # a displacement of 4.4 voxels
    assert pair.spacing == (2.0, 2.0, 2.0) and pair.name == "toy"
    assert pair.true_field.shape == (1, 3, 20, 18, 16)
    assert torch.equal(pair.fixed_mask, (pair.fixed_labels > 0).float())
    warped = spatial.warp(pair.moving, pair.true_field)
    assert (warped - pair.fixed).abs().mean() < 0.4 * (pair.moving - pair.fixed).abs().mean()
    first, second = source.validation(), source.validation()
    assert [p.name for p in first] == ["synthetic-0", "synthetic-1"]
    assert torch.equal(first[1].fixed, second[1].fixed) and not torch.equal(first[0].fixed, first[1].fixed)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_synthetic_source_on_a_device_makes_the_same_pairs_there(device):
    source = SyntheticSource([_toy_anatomy()], options=SynthOptions(max_displacement=6.0))
    moved = source.to(device)
    assert source.device == torch.device("cpu") and moved.device == torch.device(device)
    for seed in (1, 2):
        here, there = (s.sample(torch.Generator().manual_seed(seed)) for s in (source, moved))
        assert there.fixed.device.type == device and here.fixed.device.type == "cpu"
        assert torch.equal(here.fixed_labels, there.fixed_labels.cpu())
        for name in ("fixed", "moving", "true_field"):  # float kernels may differ by rounding between devices
            torch.testing.assert_close(getattr(there, name).cpu(), getattr(here, name), rtol=0, atol=1e-4)
    labels, _ = moved._tensors[0]  # the anatomy is moved once and kept there; the original source is unchanged
    assert len(moved._tensors) == 1 and labels.device.type == device and source._tensors[0][0].device.type == "cpu"


def test_own_label_maps_and_images_from_files_make_synthetic_pairs(tmp_path):
    toy = _toy_anatomy()
    # stored with the first axis right to left (LAS): the anatomy comes back on a RAS brain grid
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    labels = save_image(Image(toy.labels.data[::-1].copy(), las), tmp_path / "sub-01_dseg.nii.gz")
    image = save_image(Image(toy.image.data[::-1].copy(), las), tmp_path / "sub-01_T1w.nii.gz")
    alone = load_anatomy(str(labels), 2.0)
    assert alone.image is None and alone.name == str(labels)
    assert np.allclose(np.diag(alone.labels.grid.affine)[:3], 2.0)  # RAS, 2 mm
    assert np.array_equal(np.unique(alone.labels.data), [0, 1, 2])
    lo, hi = np.argwhere(alone.labels.data == 2).min(0), np.argwhere(alone.labels.data == 2).max(0)
    assert np.array_equal(hi - lo + 1, [5, 6, 5])  # the inner box, 5 x 6 x 5 voxels of 2 mm, kept its size

    options = SynthOptions(max_displacement=4.0, gamma=0, bias=0, blur=0, noise=0, real_intensity=1.0)
    source = make_source({"kind": "synthetic", "resolution_mm": 2.0, "options": options.__dict__,
                          "anatomies": [str(labels), {"labels": str(labels), "image": str(image)}]})
    with_image = source.anatomies[1]
    assert with_image.image.grid == with_image.labels.grid == alone.labels.grid
    assert with_image.image.data.max() == pytest.approx(1.0) and with_image.image.data[alone.labels.data == 0].max() == 0
    for anatomy in source.anatomies:  # labels alone: random label intensities; with the image: the image
        pair = source.sample(torch.Generator().manual_seed(1), anatomy)
        assert pair.spacing == (2.0, 2.0, 2.0)
        inside = torch.from_numpy(ndimage.binary_erosion(pair.fixed_labels[0, 0].numpy() == 2))
        spread = float(pair.fixed[0, 0][inside].std())
        assert spread < 1e-3 if anatomy.image is None else spread > 0.02, (anatomy.image is None, spread)
    with pytest.raises(InputError, match="or a label-map file"):
        make_source({"kind": "synthetic", "anatomies": [str(tmp_path / "missing_dseg.nii.gz")]})
    with pytest.raises(ValueError, match="needs 'labels'"):
        make_source({"kind": "synthetic", "anatomies": [{"image": str(image)}]})


def test_step_pairs_depend_on_seed_and_step_only():
    source = SyntheticSource([_toy_anatomy()])
    steps = StepPairs(source, seed=3, steps=range(5, 9))
    assert len(steps) == 4
    assert torch.equal(steps[1].fixed, StepPairs(source, seed=3, steps=range(6, 7))[0].fixed)
    assert not torch.equal(steps[1].fixed, steps[2].fixed)
    assert not torch.equal(steps[1].fixed, StepPairs(source, seed=4, steps=range(5, 9))[1].fixed)


def test_batches_of_pairs(nlst):
    small = _toy_anatomy()
    large = Anatomy("large", small.image.with_data(np.pad(small.image.data, 1)),
                    small.labels.with_data(np.pad(small.labels.data, 1)))
    source = SyntheticSource([small, large])
    for seed in range(4):  # one anatomy per batch, whichever is drawn
        batch = source.sample_batch(torch.Generator().manual_seed(seed), 3)
        assert batch.fixed.shape[0] == batch.true_field.shape[0] == batch.fixed_labels.shape[0] == 3
    first, second = (source.sample(torch.Generator().manual_seed(0), anatomy) for anatomy in (small, large))
    with pytest.raises(ValueError, match="one shape"):
        concatenate([first, second])
    both = concatenate([first, first])
    assert torch.equal(both.moving[1:], first.moving) and both.name == "toy+toy"
    paired = Learn2RegSource(nlst)
    with pytest.raises(ValueError, match="keypoints"):
        paired.sample_batch(torch.Generator().manual_seed(0), 2)
    assert StepPairs(source, seed=0, steps=range(3), batch_size=2)[0].fixed.shape[0] == 2


def test_make_source(oasis):
    assert isinstance(make_source({"kind": "learn2reg", "dataset_json": str(oasis)}), Learn2RegSource)
    synthetic = make_source({"kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 8.0,
                             "options": {"max_displacement": 2.0}})
    assert synthetic.options.max_displacement == 2.0
    with pytest.raises(ValueError, match="data kind"):
        make_source({"kind": "hcp"})
