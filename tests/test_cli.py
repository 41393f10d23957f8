"""``rwcflow-register`` end to end on the bundled MNI152 example (4 mm). Its bad-input errors are tested
in test_bad_input.py."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from nitransforms import linear, nonlinear
from nitransforms.manip import TransformChain
from nitransforms.resampling import apply

from rwcflow import checkpoint, cli
from rwcflow.example import make_example_pair
from rwcflow.io import load_image, resample
from rwcflow.metrics import dice, endpoint_error, mean_score
from rwcflow.models import RWCNet, RWCNetConfig
from rwcflow.transforms import read_displacement_field

OUTPUTS = {"warped.nii.gz", "xfm.nii.gz", "affine.txt", "warped_labels.nii.gz", "metrics.json"}


@pytest.fixture(scope="module")
def pair():
    return make_example_pair(resolution_mm=4.0, max_displacement_mm=10.0, seed=3)


@pytest.fixture(scope="module")
def pair_files(pair, tmp_path_factory):
    return pair.write(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def registered(pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered")
    code = cli.main([
        "--fixed", str(pair_files["fixed"]), "--moving", str(pair_files["moving"]),
        "--fixed-labels", str(pair_files["fixed_labels"]), "--moving-labels", str(pair_files["moving_labels"]),
        "--out-dir", str(out), "--model", "none", "--device", "cpu",
    ])
    assert code == 0
    return out


def _args(files, out, **changes):
    values = {"--fixed": files["fixed"], "--moving": files["moving"], "--out-dir": out,
              "--model": "none", "--io-iters": "2", **changes}
    args = []
    for key, value in values.items():
        args += [key] if value is None else [key, str(value)]
    return args


def test_writes_every_output_and_nothing_else(registered):
    assert {p.name for p in registered.iterdir()} == OUTPUTS
    warped = nib.load(registered / "warped.nii.gz")
    xfm = nib.load(registered / "xfm.nii.gz")
    assert xfm.shape == (*warped.shape, 1, 3)
    assert xfm.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(xfm.affine, warped.affine)


def test_recovers_a_known_deformation_of_real_anatomy(registered, pair):
    disp, grid = read_displacement_field(registered / "xfm.nii.gz")
    brain = pair.fixed_labels.data > 0
    initial = np.linalg.norm(pair.true_displacement, axis=-1)[brain].mean()
    error, _ = endpoint_error(np.moveaxis(disp, -1, 0), np.moveaxis(pair.true_displacement, -1, 0), mask=brain)
    assert error < 0.4 * initial, (error, initial)

    metrics = json.loads((registered / "metrics.json").read_text())
    unregistered = resample(pair.moving_labels, pair.fixed.grid, labels=True)  # identity in world space
    identity = mean_score(dice(pair.fixed_labels.data, unregistered.data))
    assert metrics["dice_mean"] > identity + 0.15, (metrics["dice_mean"], identity)
    assert metrics["folding_percent"] < 1.0
    assert set(metrics["dice"]) == {"1", "2", "3"}


def test_xfm_applied_by_nitransforms_reproduces_warped(registered, pair_files):
    warped = nib.load(registered / "warped.nii.gz")
    xfm = nonlinear.load(str(registered / "xfm.nii.gz"), fmt="itk")
    theirs = np.asanyarray(apply(xfm, str(pair_files["moving"]), reference=warped, order=1,
                                 mode="constant", cval=0.0).dataobj)
    ours = warped.get_fdata()
    # compare where the mapped point lies inside the moving grid (the two differ in how they pad)
    disp, grid = read_displacement_field(registered / "xfm.nii.gz")
    moving = load_image(pair_files["moving"])
    points = grid.voxel_to_world(np.moveaxis(np.indices(grid.shape), 0, -1)) + disp
    coords = moving.grid.world_to_voxel(points)
    inside = np.all((coords >= 0) & (coords <= np.array(moving.grid.shape) - 1), axis=-1)
    assert inside.mean() > 0.75
    assert np.abs(theirs - ours)[inside].max() < 1e-3 * ours.max()


def test_runs_with_a_network_model_file(pair_files, tmp_path):
    torch.manual_seed(0)
    model = checkpoint.save_model(RWCNet(RWCNetConfig.tiny()), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    assert cli.main(_args(pair_files, out, **{"--model": model, "--io-iters": "0"})) == 0
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "xfm.nii.gz", "affine.txt"}


def test_singleton_fourth_axis_is_accepted(pair_files, tmp_path):
    fixed = nib.load(pair_files["fixed"])
    path = tmp_path / "fixed4d.nii.gz"
    nib.save(nib.Nifti1Image(fixed.get_fdata()[..., None].astype(np.float32), fixed.affine), path)
    assert cli.main(_args(pair_files, tmp_path / "out", **{"--fixed": path})) == 0


def test_separate_affine_chain_equals_the_composed_field(pair_files, tmp_path):
    separate, combined = tmp_path / "separate", tmp_path / "combined"
    assert cli.main(_args(pair_files, separate, **{"--separate-affine": None})) == 0
    assert cli.main(_args(pair_files, combined)) == 0
    chain = TransformChain([nonlinear.load(str(separate / "xfm.nii.gz"), fmt="itk"),
                            linear.load(str(separate / "affine.txt"), fmt="itk")])
    whole, grid = read_displacement_field(combined / "xfm.nii.gz")
    points = grid.voxel_to_world(np.moveaxis(np.indices(grid.shape), 0, -1)).reshape(-1, 3)
    np.testing.assert_allclose(chain.map(points), points + whole.reshape(-1, 3), atol=1e-3)


def test_staging_folders_a_killed_run_left_are_removed(pair_files, tmp_path):
    out = tmp_path / "out"
    stale, fresh = out / ".rwcflow-killed", out / ".rwcflow-running"
    stale.mkdir(parents=True)
    fresh.mkdir()
    (stale / "warped.nii.gz").write_text("half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cli.main(_args(pair_files, out)) == 0
    assert not stale.exists() and fresh.is_dir()  # a staging folder of seconds ago may be another run's
    assert {path.name for path in out.iterdir()} == {"warped.nii.gz", "xfm.nii.gz", "affine.txt", fresh.name}
