"""``rwcflow-register`` end to end on the bundled MNI152 example (4 mm), and its bad-input errors."""

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


def _bad_inputs(tmp_path, files):
    fixed = nib.load(files["fixed"])
    data = fixed.get_fdata().astype(np.float32)
    bad = {}

    def image(name, array, affine=fixed.affine):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(array, affine), path)
        return path

    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    bad["missing file"] = ({"--moving": tmp_path / "absent.nii.gz"}, "absent.nii.gz", "not found")
    bad["non-image file"] = ({"--moving": text}, "notes.nii.gz", "not a readable")
    bad["several volumes"] = ({"--moving": image("4d.nii.gz", np.stack([data, data], -1))}, "4d.nii.gz", "volumes")
    bad["all zero"] = ({"--fixed": image("zero.nii.gz", np.zeros_like(data))}, "zero.nii.gz", "all zeros")
    nan = data.copy()
    nan[3, 3, 3] = np.nan
    bad["NaN"] = ({"--fixed": image("nan.nii.gz", nan)}, "nan.nii.gz", "NaN")
    shifted = fixed.affine.copy()
    shifted[:3, 3] += 10
    labels = image("labels_elsewhere.nii.gz", (data > 0).astype(np.int16), shifted)
    bad["labels on another grid"] = ({"--fixed-labels": labels}, "labels_elsewhere.nii.gz", "another grid")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    bad["corrupt model"] = ({"--model": corrupt}, "corrupt.safetensors", "safetensors")
    bad["missing model"] = ({"--model": tmp_path / "nope.safetensors"}, "nope.safetensors", "no such model file")
    bad["negative iterations"] = ({"--io-iters": "-5"}, "--io-iters", "must be 0 or more, got -5")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad["out-dir is a file"] = ({"--out-dir": blocker}, "a-file", "--out-dir: is a file, not a folder")
    bad["out-dir under a file"] = ({"--out-dir": blocker / "out"}, "a-file", "lies under the file")
    if not torch.cuda.is_available():
        bad["cuda without a GPU"] = ({"--device": "cuda"}, "--device", "no CUDA device is available")
    return bad


def test_bad_input_gives_one_clear_line_and_no_outputs(pair_files, tmp_path, capsys):
    for name, (changes, filename, problem) in _bad_inputs(tmp_path, pair_files).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code = cli.main(_args(pair_files, out, **changes))
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1, (name, err)
        assert filename in err and problem in err, (name, err)
        assert not out.exists() or not any(out.iterdir()), name


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
