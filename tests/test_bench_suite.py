"""The benchmark suite (benchmarks/) on small inputs with known answers; no peer nor big data package needed."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from benchmarks import report, worker
from benchmarks.cases import Case
from benchmarks.data import brain_grid, build_case
from benchmarks.evaluate import evaluate, voxel_field
from benchmarks.learn2reg import learn2reg_cases
from benchmarks.methods import Context, make_method
from benchmarks.run import earlier_records, run, with_earlier
from benchmarks.system import engine_version
from rwcflow import checkpoint, spatial, transforms
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.models import RWCNet, RWCNetConfig


def affine(linear, origin) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = linear, origin
    return matrix


def cube(shape, lo, hi, label=1) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return labels


def write_case(folder, name, grid_affine, fixed, moving, fixed_labels=None, moving_labels=None, **extra):
    """A case of arrays on one grid, written into ``folder``; the case and its case.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"fixed": save_image(Image(fixed, grid_affine), folder / "fixed.nii.gz"),
             "moving": save_image(Image(moving, grid_affine), folder / "moving.nii.gz")}
    if fixed_labels is not None:
        paths["fixed_labels"] = save_image(Image(fixed_labels, grid_affine), folder / "fixed_labels.nii.gz")
        paths["moving_labels"] = save_image(Image(moving_labels, grid_affine), folder / "moving_labels.nii.gz")
    case = Case(name=name, group="test", **paths, **extra)
    return case, case.save(folder / "case.json")


def write_xfm(path, displacement, grid_affine, shape):
    return transforms.write_displacement_field(path, displacement, Grid(shape, grid_affine))


def test_spawned_runs_score_identical_labels_report_failures_and_skip_missing_peers(tmp_path, smooth_volume, capsys):
    shape, grid_affine = (20, 22, 18), affine(np.diag([1.5, 1.2, 2.0]), [-10, 5, 3])
    image = smooth_volume(shape)[0, 0].numpy()
    labels = cube(shape, (3, 4, 2), (12, 15, 10), 1) + cube(shape, (13, 4, 11), (18, 20, 16), 4)
    same, same_json = write_case(tmp_path / "same", "same", grid_affine, image, image, labels, labels)
    broken, broken_json = write_case(tmp_path / "broken", "broken", grid_affine, image, image)
    broken.moving.write_bytes(b"not an image")  # a real method meets an unreadable input
    context = Context(threads=1, ants_python=str(tmp_path / "no-such-python"))

    records, skipped = run([(same, same_json), (broken, broken_json)], ["identity", "ants-syn", "rwcnet"],
                           context, timeout=300, work=tmp_path / "work")

    out = capsys.readouterr().out
    assert "skipping ants-syn: antspyx interpreter" in out and "skipping rwcnet: no trained RWCNet model" in out
    assert set(skipped) == {"ants-syn", "rwcnet"}
    ok, failed = records
    assert ok["status"] == "ok" and ok["threads"] == 1 and ok["peak_rss_mb"] > 0
    m = ok["metrics"]
    assert m["dice"] == {"1": 1.0, "4": 1.0} and m["dice_mean"] == 1.0 and m["hd95_mean"] == 0.0
    assert m["folding_percent"] == 0.0 and m["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert failed["status"].startswith("failed: InputError") and "not a readable" in failed["status"]
    assert "metrics" not in failed

    written = report.write_report({"environment": {"date": "d", "processor": "p", "cpu_count": 2, "python": "3"},
                                   "settings": {"threads": 1, "device": "cpu"}, "skipped": skipped,
                                   "records": records}, tmp_path / "results" / "bench")
    names = sorted(p.name for p in written)
    figures = ["bench_dice_time.png", "bench_label_dice.png"] if importlib.util.find_spec("matplotlib") else []
    assert names == ["bench.json", "bench.md", *figures]
    assert all(p.stat().st_size > 0 for p in written)
    assert json.loads((tmp_path / "results" / "bench.json").read_text())["records"][0]["metrics"]["dice_mean"] == 1.0
    markdown = (tmp_path / "results" / "bench.md").read_text()
    assert "| identity | 1.000 ± 0.000 | 0.00 |" in markdown
    assert "- skipped ants-syn:" in markdown and "failed: InputError" in markdown


def test_rwcnet_runners_take_any_model_file(tmp_path, smooth_volume):
    model = checkpoint.save_model(RWCNet(RWCNetConfig.tiny()).eval(), tmp_path / "any.safetensors")
    shape, grid_affine = (20, 18, 16), affine(np.diag([2.0, 2.0, 2.0]), [0, 0, 0])
    image = smooth_volume(shape)[0, 0].numpy()
    labels = cube(shape, (4, 4, 4), (14, 12, 11))
    case, _ = write_case(tmp_path / "case", "pair", grid_affine, image, np.roll(image, 1, axis=0), labels,
                         np.roll(labels, 1, axis=0))
    assert make_method("rwcnet-io").missing(Context()) is not None
    for spec, context in (("rwcnet-io", Context(model=str(model))), (f"rwcnet:model={model}", Context())):
        assert make_method(spec).missing(context) is None
        out = tmp_path / spec.split(":")[0]
        record = worker.run(case, spec, out, context)
        assert record["wall_s"] > 0 and record["network_s"] > 0 and record["peak_rss_mb"] > 0
        assert (record["instance_optimization_s"] > 0.01) == (spec == "rwcnet-io")
        assert evaluate(case, out / worker.XFM)["n_labels"] == 1


def test_known_shift_gives_known_hd95_and_the_shift_itself_dice_1(tmp_path):
    # an LIA-like grid with anisotropic voxels: the moving cube lies k = 2 voxels further along axis 2
    shape, k, spacing = (16, 16, 16), 2, np.array([0.8, 1.0, 2.5])
    linear = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]) * spacing
    grid_affine = affine(linear, [20, -8, 12])
    fixed_labels = cube(shape, (3, 3, 3), (10, 10, 10))
    moving_labels = np.roll(fixed_labels, k, axis=2)
    image = fixed_labels.astype(np.float32) + 0.1
    case, _ = write_case(tmp_path, "shift", grid_affine, image, image, fixed_labels, moving_labels)

    zero = write_xfm(tmp_path / "zero.nii.gz", np.zeros((*shape, 3)), grid_affine, shape)
    assert evaluate(case, zero)["hd95_mean"] == pytest.approx(k * spacing[2])  # 5 mm, the cube's face left behind
    shift = np.broadcast_to(linear @ np.array([0.0, 0.0, k]), (*shape, 3))
    exact = evaluate(case, write_xfm(tmp_path / "shift.nii.gz", shift, grid_affine, shape))
    assert exact["dice_mean"] == 1.0 and exact["hd95_mean"] == 0.0 and exact["folding_percent"] == 0.0


def test_known_affine_field_has_its_jacobian_and_no_folding(tmp_path):
    shape = (14, 12, 16)
    grid_affine = affine(Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() @ np.diag([1.2, 0.9, 1.5]),
                         [-5, 3, 7])
    grid = Grid(shape, grid_affine)
    world = affine(Rotation.from_euler("z", 15, degrees=True).as_matrix() @ np.diag([1.1, 0.9, 1.2]), [3.0, -2.0, 1.0])
    displacement = grid.world_points() @ world[:3, :3].T + world[:3, 3] - grid.world_points()
    field = torch.from_numpy(voxel_field(displacement, grid))[None]
    np.testing.assert_allclose(spatial.jacobian_determinant(field).numpy(), 1.1 * 0.9 * 1.2, rtol=1e-9)

    image = np.random.default_rng(0).random(shape).astype(np.float32)
    case, _ = write_case(tmp_path, "affine", grid_affine, image, image)
    scores = evaluate(case, write_xfm(tmp_path / "xfm.nii.gz", displacement, grid_affine, shape))
    assert scores["folding_percent"] == 0.0
    assert scores["sdlogj"] == pytest.approx(0.0, abs=1e-5) and scores["std_log_jacobian"] == pytest.approx(0.0, abs=1e-5)


def test_synthetic_case_from_mni152_stores_its_true_field(tmp_path):
    case = build_case(tmp_path, "mni-4mm-d08-s1")
    assert (case.name, case.group) == ("mni-4mm-d08-s1", "mni-4mm-d08")
    fixed, moving = load_image(case.fixed), load_image(case.moving)
    assert max(fixed.data.shape) <= 48 and np.allclose(fixed.grid.spacing, 4.0)
    true, grid = transforms.read_displacement_field(case.true_xfm)
    assert grid == fixed.grid and np.linalg.norm(true, axis=-1).max() == pytest.approx(8.0, rel=1e-4)
    assert set(np.unique(load_image(case.fixed_labels, labels=True).data)) == {0, 1, 2, 3}
    # pulling the moving labels back through the true field gives the fixed labels (up to nearest-neighbour rounding)
    fixed_labels = load_image(case.fixed_labels, labels=True).data
    moving_labels = load_image(case.moving_labels, labels=True)
    back = transforms.apply_displacement(moving_labels, true, grid, labels=True).data
    brain = fixed_labels > 0
    assert np.mean(back[brain] == fixed_labels[brain]) > 0.97
    assert np.mean(moving_labels.data[brain] == fixed_labels[brain]) < 0.9
    assert not np.allclose(moving.data, fixed.data)

    truth = evaluate(case, case.true_xfm)
    identity = evaluate(case, write_xfm(tmp_path / "zero.nii.gz", np.zeros_like(true), grid.affine, grid.shape))
    assert truth["epe_mean_mm"] == 0.0 and truth["epe_p95_mm"] == 0.0
    assert identity["epe_mean_mm"] > 1.0 and truth["dice_mean"] > identity["dice_mean"] + 0.05
    assert case == Case.load(tmp_path / "cases" / case.name / "case.json")  # served from the cache


def test_brain_grid_covers_every_image_with_a_margin():
    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[2:5, 3:8, 4:6] = 1.0
    flipped = Image(data, affine(np.diag([-2.0, 1.0, 1.0]), [30, 0, 0]))  # voxels x = 30 - 2 i
    grid = brain_grid([flipped], resolution=1.0, margin_mm=2.0)
    np.testing.assert_allclose(grid.affine[:3, 3], [22 - 2, 3 - 2, 4 - 2])
    assert grid.shape == (4 + 4 + 1, 4 + 4 + 1, 1 + 4 + 1)


def test_learn2reg_dataset_json_gives_cases_with_labels_and_voxel_keypoints(tmp_path):
    shape, spacing = (16, 18, 14), 2.0
    grid_affine = affine(np.diag([spacing] * 3), [0, 0, 0])
    for folder in ("imagesTr", "labelsTr", "keypoints01Tr"):
        (tmp_path / folder).mkdir()
    labels = cube(shape, (3, 4, 3), (9, 12, 10), 2)
    image = labels.astype(np.float32) + 1.0
    points = np.array([[4.0, 5.0, 6.0], [7.5, 8.0, 4.25], [10.0, 10.0, 9.0]])
    for index, (shift, name) in enumerate(((0, "X_0001_0000"), (1, "X_0001_0001"))):
        save_image(Image(np.roll(image, shift, axis=0), grid_affine), tmp_path / "imagesTr" / f"{name}.nii.gz")
        save_image(Image(np.roll(labels, shift, axis=0), grid_affine), tmp_path / "labelsTr" / f"{name}.nii.gz")
        np.savetxt(tmp_path / "keypoints01Tr" / f"{name}.csv", points + [shift, 0, 0], delimiter=",")
    entries = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz",
                "keypoints01": f"./keypoints01Tr/{n}.nii.gz"}  # listed as .nii.gz, stored as .csv
               for n in ("X_0001_0000", "X_0001_0001")]
    pairs = [{"fixed": "./imagesTr/X_0001_0000.nii.gz", "moving": "./imagesTr/X_0001_0001.nii.gz"}]
    dataset = tmp_path / "X_dataset.json"
    dataset.write_text(json.dumps({"name": "X", "training": entries, "registration_val": pairs}))

    (case,) = learn2reg_cases(dataset)
    assert case.name == "X-X_0001_0000-X_0001_0001" and case.group == "X-registration_val"
    assert case.fixed_keypoints.name == "X_0001_0000.csv" and case.keypoint_units == "voxel"
    assert case.moving_labels.name == "X_0001_0001.nii.gz"
    zero = evaluate(case, write_xfm(tmp_path / "zero.nii.gz", np.zeros((*shape, 3)), grid_affine, shape))
    assert zero["tre_mm"] == pytest.approx(spacing) and zero["dice_mean"] < 1.0
    shifted = np.broadcast_to([spacing, 0.0, 0.0], (*shape, 3))
    exact = evaluate(case, write_xfm(tmp_path / "shift.nii.gz", shifted, grid_affine, shape))
    assert exact["tre_mm"] == pytest.approx(0.0, abs=1e-6) and exact["dice_mean"] == 1.0
    with pytest.raises(ValueError, match="no pairs"):
        learn2reg_cases(dataset, "registration_test")


def test_method_specs_and_time_ratios():
    method = make_method("rwcflow-io-fast:iterations=20,diffeomorphic=true")
    assert (method.options.grid_factor, method.options.iterations, method.options.diffeomorphic) == (3, 20, True)
    assert make_method("niftyreg:be=0.005,sx=-5").options == ["-be", "0.005", "-sx", "-5"]
    with pytest.raises(ValueError, match="unknown option"):
        make_method("rwcflow-io:iteratons=3")
    with pytest.raises(ValueError, match="unknown method"):
        make_method("elastix")
    records = [{"case": "a", "method": "ants-syn", "status": "ok", "wall_s": 40.0},
               {"case": "a", "method": "rwcflow-io", "status": "ok", "wall_s": 10.0},
               {"case": "b", "method": "rwcflow-io", "status": "ok", "wall_s": 10.0}]
    report.add_time_ratios(records)
    assert records[1]["time_ratio_ants"] == 0.25 and "time_ratio_ants" not in records[2]
    assert math.isclose(records[0]["time_ratio_ants"], 1.0)


def test_resume_keeps_whole_cases_measured_with_the_same_engine_and_data(tmp_path, smooth_volume, capsys):
    shape, grid_affine = (16, 18, 14), affine(np.diag([2.0, 2.0, 2.0]), [0, 0, 0])
    image = smooth_volume(shape)[0, 0].numpy()
    labels = cube(shape, (3, 3, 3), (10, 12, 9))
    case, case_json = write_case(tmp_path / "case", "pair", grid_affine, image, image, labels, labels)
    context, methods, work = Context(threads=1), ["identity", "affine"], tmp_path / "work"
    first, _ = run([(case, case_json)], methods, context, timeout=300, work=work, engine="engine-1")
    report.write_report({"environment": {"date": "d", "processor": "p", "cpu_count": 2, "python": "3"},
                         "settings": {"threads": 1, "device": "cpu"}, "skipped": {},
                         "records": first}, tmp_path / "bench")
    earlier = earlier_records(tmp_path / "bench.json", 1, "cpu")
    assert [r["method"] for r in earlier] == methods and earlier[0]["case_digest"] == case.digest()
    assert {r["engine"] for r in earlier} == {"engine-1"}
    with pytest.raises(ValueError, match="threads=1 device=cpu, not threads=2"):
        earlier_records(tmp_path / "bench.json", 2, "cpu")
    assert earlier_records(tmp_path / "absent.json", 1, "cpu") == []

    capsys.readouterr()
    kept, _ = run([(case, case_json)], methods, context, timeout=300, work=work, earlier=earlier, engine="engine-1")
    assert "pair                     kept from " in capsys.readouterr().out
    assert [(r["date"], r["metrics"]) for r in kept] == [(r["date"], r["metrics"]) for r in earlier]

    # a method missing, or another engine: the whole case runs again (its times from one sitting)
    for partial, engine in ((earlier[:1], "engine-1"), (earlier, "engine-2")):
        again, _ = run([(case, case_json)], methods, context, timeout=300, work=work, earlier=partial,
                       engine=engine)
        out = capsys.readouterr().out
        assert "kept from" not in out and re.search(r"pair +identity +[0-9.]+ s  Dice 1\.000  ok", out)
        assert [r["status"] for r in again] == ["ok", "ok"]
    elsewhere = {**earlier[0], "case": "another"}  # a case this run did not reach stays in the results
    assert with_earlier(again, [*earlier, elsewhere]) == [*again, elsewhere]

    save_image(Image(np.roll(labels, 2, axis=0), grid_affine), case.moving_labels)  # the case's data changed
    assert case.digest() != earlier[0]["case_digest"]
    rerun, _ = run([(case, case_json)], methods, context, timeout=300, work=work, earlier=earlier, engine="engine-1")
    assert "kept from" not in capsys.readouterr().out
    assert rerun[0]["case_digest"] == case.digest() and rerun[0]["metrics"]["dice_mean"] < 1.0


def test_engine_version_digests_the_source_of_the_registration_code(tmp_path, monkeypatch):
    version = engine_version()
    assert re.fullmatch(r"[0-9a-f]{64}", version) and engine_version() == version
    # an edit of a module the methods run (here the sampling code, imported through rwcflow.register)
    edited = tmp_path / "spatial.py"
    edited.write_text(Path(spatial.__file__).read_text() + "# edited\n")
    monkeypatch.setattr(spatial, "__file__", str(edited))
    assert engine_version() != version
