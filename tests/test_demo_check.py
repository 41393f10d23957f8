"""rwcflow-demo-check against derivatives with a known answer: made from the demo's own truth (session 1
as the template, session 2's true mapping and its Jacobian), the check must find the true volume change
in the sphere and no change far from it; derivatives that recover nothing must fail it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rwcflow import transforms
from rwcflow.bids_app.cli import main as app_main
from rwcflow.bids_app.demo import write_demo_dataset
from rwcflow.bids_app.demo_check import check_demo, main, shape_error, template_row, true_mean_shape
from rwcflow.example import rigid_matrix
from rwcflow.io import Image, load_image, resample, save_image
from rwcflow.maps import average_images
from rwcflow.maps import invert_displacement, jacobian_from_world_field, resample_displacement

SPACE = "T1w"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "raw", participants=1, sessions=2,
                              resolution_mm=4.0, atrophy_percent=5.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two participants of one session each: what a group template is built from."""
    return write_demo_dataset(tmp_path_factory.mktemp("cohort") / "raw", participants=2, sessions=1,
                              resolution_mm=4.0)


def _derivatives(raw: Path, out: Path, *, recovered: bool) -> Path:
    """Participant-level derivatives of sub-01 in session 1's space: the template is session 1 and its
    transform the identity; session 2's transform is the true session-1 -> session-2 mapping (the inverse
    of the truth's session-2 -> session-1 field) when ``recovered``, else the identity too."""
    truth_dir = raw / "sourcedata" / "truth" / "sub-01"
    truth = json.loads((truth_dir / "sub-01_truth.json").read_text())
    first = load_image(raw / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    grid = first.grid
    save_image(first, out / "sub-01" / "anat" / "sub-01_desc-template_T1w.nii.gz")
    identity = np.zeros((*grid.shape, 3))
    to_first, second_grid = transforms.read_displacement_field(truth_dir / truth["atrophy"]["sessions"]["ses-2"]["xfm"])
    to_second = resample_displacement(invert_displacement(to_first, second_grid), second_grid, grid)
    for ses, disp in (("1", identity), ("2", to_second if recovered else identity)):
        anat = out / "sub-01" / f"ses-{ses}" / "anat"
        transforms.write_displacement_field(anat / f"sub-01_ses-{ses}_from-orig_to-{SPACE}_mode-image_xfm.nii.gz",
                                            disp, grid)
        jacobian = jacobian_from_world_field(disp, grid).astype(np.float32)
        save_image(first.with_data(jacobian), anat / f"sub-01_ses-{ses}_space-{SPACE}_jacobian.nii.gz")
    return out


def test_the_true_mapping_passes_with_the_true_change_and_a_flat_far_field(raw, tmp_path):
    out = _derivatives(raw, tmp_path / "out", recovered=True)
    (row,) = check_demo(raw, out)
    assert (row.participant, row.session, row.true_change_percent) == ("sub-01", "ses-2", -5.0)
    assert row.recovered_change_percent == pytest.approx(-5.0, abs=0.1)
    assert row.far_field_mean_abs_log_change < 1e-3
    assert row.region_voxels > 20 and row.far_voxels > 1000
    assert row.passed


def test_no_change_found_fails_and_the_command_says_so(raw, tmp_path, capsys):
    out = _derivatives(raw, tmp_path / "out", recovered=False)
    assert main([str(raw), str(out)]) == 1
    printed = capsys.readouterr().out
    assert "| sub-01 | ses-2 | -5.00 % | 0.00 % | +5.00 pp | 0.0000 | FAIL |" in printed
    report = json.loads((out / "demo_validation.json").read_text())
    assert report["passed"] is False and report["rows"][0]["error_pp"] == 5.0


def test_missing_derivatives_are_bad_input(raw, tmp_path, capsys):
    assert main([str(raw), str(tmp_path / "nothing")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rwcflow-demo-check: error: ") and "desc-template_T1w.nii.gz: file not found" in line
    assert not (tmp_path / "nothing").exists()


def test_the_apps_default_path_recovers_the_demos_change(tmp_path):
    """The README's main job, small: rwcflow's participant level with its default options on a 4 mm demo
    (two participants, grids under 48³), then rwcflow-demo-check. At 4 mm the sphere's core is two voxels
    across its radius, so the tolerance is wider than the 3 mm demo's ±0.5 pp; the change must have the
    truth's sign and size, and the far field stay flat."""
    raw = write_demo_dataset(tmp_path / "raw", participants=2, sessions=2, resolution_mm=4.0)
    out = tmp_path / "out"
    assert app_main([str(raw), str(out), "participant", "-w", str(tmp_path / "work")]) == 0
    rows = check_demo(raw, out, tolerance_pp=1.0, far_limit=0.005)
    assert [row.participant for row in rows] == ["sub-01", "sub-02"]
    for row in rows:
        assert row.recovered_change_percent < 0, row
        assert row.passed, row


def _truths(raw: Path, labels: list[str]) -> list[dict]:
    return [json.loads((raw / "sourcedata" / "truth" / label / f"{label}_truth.json").read_text()) for label in labels]


def _session_1(raw: Path, label: str):
    return load_image(raw / label / "ses-1" / "anat" / f"{label}_ses-1_T1w.nii.gz")


def test_one_participants_true_mean_shape_is_its_own_brain(cohort):
    """With one participant the mean of the maps is its own map: the shape is its session-1 brain, up to the
    noise and the blur of two more trilinear resamplings at 4 mm (0.019; 0.011 at 3 mm), and not the other
    participant's (0.13)."""
    shape = true_mean_shape(cohort / "sourcedata" / "truth", _truths(cohort, ["sub-01"]))
    own, other = shape_error(_session_1(cohort, "sub-01"), shape), shape_error(_session_1(cohort, "sub-02"), shape)
    assert own < 0.03 and other > 5 * own


def _group_derivatives(raw: Path, out: Path, template, average) -> Path:
    """A group level's template files: ``template`` as tpl-unbiased, ``average`` as its iteration 0."""
    save_image(template, out / "tpl-unbiased" / "tpl-unbiased_T1w.nii.gz")
    save_image(average, out / "tpl-unbiased" / "tpl-unbiased_desc-iteration0_T1w.nii.gz")
    sources = [f"bids::sub-{n}/anat/sub-{n}_desc-template_T1w.nii.gz" for n in ("01", "02")]
    (out / "tpl-unbiased" / "tpl-unbiased_T1w.json").write_text(json.dumps({"Sources": sources}))
    return out


def _plain_average(raw: Path):
    first, second = _session_1(raw, "sub-01"), _session_1(raw, "sub-02")
    return average_images([first, resample(second, first.grid)])


def test_the_true_mean_shape_moved_rigidly_passes_against_the_plain_average(cohort, tmp_path):
    shape = true_mean_shape(cohort / "sourcedata" / "truth", _truths(cohort, ["sub-01", "sub-02"]))
    middle = shape.grid.voxel_to_world((np.array(shape.grid.shape) - 1) / 2.0)
    moved = Image(shape.data, rigid_matrix((4.0, -2.0, 1.0), (3.0, 0.0, -2.0), middle) @ shape.affine)  # header only
    out = _group_derivatives(cohort, tmp_path / "out", moved, _plain_average(cohort))
    row = template_row(cohort, out)
    assert row.participants == ("sub-01", "sub-02")
    assert row.template_error < 0.002 and row.average_error > 10 * row.template_error
    assert row.passed


def test_a_template_no_better_than_the_plain_average_fails(cohort, tmp_path, capsys):
    average = _plain_average(cohort)
    out = _group_derivatives(cohort, tmp_path / "out", average, average)
    assert main([str(cohort), str(out)]) == 1
    printed = capsys.readouterr().out
    assert "| sub-01, sub-02 |" in printed and "| 1.00 | FAIL |" in printed
    report = json.loads((out / "demo_validation.json").read_text())
    assert report["passed"] is False and report["rows"] == []
    assert report["group_template"]["template_error"] == report["group_template"]["average_error"] > 0


def test_without_a_group_template_only_the_participants_are_checked(raw, tmp_path, capsys):
    out = _derivatives(raw, tmp_path / "out", recovered=True)
    assert template_row(raw, out) is None
    assert main([str(raw), str(out)]) == 0
    assert "no group template (the group level has not run): not checked" in capsys.readouterr().out
