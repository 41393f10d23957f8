"""HTML reports of the BIDS App on real images: the demo dataset (2 participants × 2 sessions, 6 mm) and
maps computed from its ground truth; links and figures, sections, metrics, error boxes, a moved folder."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import rwcflow
from rwcflow import transforms
from rwcflow.bids_app.demo import write_demo_dataset
from rwcflow.bids_app.reports import (GroupResult, ParticipantResult, SessionResult, _centre, _tissue_means,
                                      citation_text, group_report, participant_report)
from rwcflow.io import Grid, Image, load_image, save_image, resample
from rwcflow.maps import average_images, jacobian_from_world_field


class Page(HTMLParser):
    """An HTML page's link targets, element ids, text, and the text inside its red error boxes."""

    def __init__(self, path: Path):
        super().__init__()
        self.targets, self.images, self.ids, self.tags, self.text, self.errors = [], [], set(), [], [], []
        self._error_depth = 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        self.ids.add(attributes.get("id"))
        for key in ("src", "href"):
            value = attributes.get(key)
            if value and not value.startswith(("#", "http", "mailto:")):
                self.targets.append(value)
        if tag == "img":
            self.images.append(attributes["src"])
        if tag == "div" and ("errors" in (attributes.get("class") or "").split() or self._error_depth):
            self._error_depth += 1

    def handle_endtag(self, tag):
        if tag == "div" and self._error_depth:
            self._error_depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._error_depth:
            self.errors.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A derivatives folder as the participant level leaves it, with maps computed from the demo's truth:
    session 1 is the template, session 2 is brought onto it by its known repositioning, and its Jacobian
    is the true atrophy field's; the group template is the demo's MNI152 brain."""
    root = tmp_path_factory.mktemp("reports")
    raw = write_demo_dataset(root / "raw", participants=2, sessions=2, resolution_mm=6.0)
    out = root / "derivatives"
    truth_dir = raw / "sourcedata" / "truth"
    group_template = save_image(load_image(truth_dir / "tpl-MNI152NLin2009aSym_desc-brain_T1w.nii.gz"),
                                out / "tpl-demo" / "tpl-demo_T1w.nii.gz")
    results, in_group = {}, {}
    for sub in ("01", "02"):
        truth = json.loads((truth_dir / f"sub-{sub}" / f"sub-{sub}_truth.json").read_text())
        raw_paths = [raw / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz" for ses in (1, 2)]
        first, second = (load_image(path) for path in raw_paths)
        anat = out / f"sub-{sub}" / "anat"
        template = save_image(first, anat / f"sub-{sub}_desc-template_T1w.nii.gz")
        ses2 = truth["atrophy"]["sessions"]["ses-2"]
        move = np.array(ses2["rigid_from_ses1_ras"])
        disp, grid = transforms.read_displacement_field(truth_dir / f"sub-{sub}" / ses2["xfm"])
        jacobian = resample(Image(jacobian_from_world_field(disp, grid).astype(np.float32), grid.affine),
                            first.grid, world_matrix=move)
        jacobians = [np.ones(first.data.shape, np.float32), np.where(jacobian.data > 0, jacobian.data, 1.0)]
        sessions, registered = [], [first, resample(second, first.grid, world_matrix=move)]
        for ses, (raw_path, image, jac) in enumerate(zip(raw_paths, registered, jacobians), start=1):
            folder = out / f"sub-{sub}" / f"ses-{ses}" / "anat"
            stem = f"sub-{sub}_ses-{ses}_space-T1w"
            sessions.append(SessionResult(
                session=str(ses), t1w=raw_path,
                registered=save_image(image, folder / f"{stem}_desc-registered_T1w.nii.gz"),
                jacobian=save_image(first.with_data(jac), folder / f"{stem}_jacobian.nii.gz"),
                log_jacobian=save_image(first.with_data(np.log(jac)), folder / f"{stem}_desc-log_jacobian.nii.gz"),
                metrics={"correlation_to_template": 0.987654321,
                         "mean_abs_log_jacobian": float(np.abs(np.log(jac)).mean())}))
        anatomy, anatomy_grid = transforms.read_displacement_field(truth_dir / f"sub-{sub}" / truth["anatomy"]["xfm"])
        in_group[sub] = save_image(transforms.apply_displacement(first, anatomy, anatomy_grid),
                                   anat / f"sub-{sub}_space-demo_desc-registered_T1w.nii.gz")
        results[sub] = ParticipantResult(sub, template, sessions, group_template=group_template,
                                         group_registered=in_group[sub], parameters={"model": "none", "io_iters": 10})
    reports = {sub: participant_report(out, result) for sub, result in results.items()}
    initial = save_image(average_images([load_image(path) for path in in_group.values()]),
                         out / "tpl-demo" / "tpl-demo_desc-iteration0_T1w.nii.gz")
    group = GroupResult(template=group_template, iteration_templates=[initial, group_template],
                        convergence=[{"update": 1, "update_norm_mm": 1.25}, {"update": 2, "update_norm_mm": 0.375}],
                        participants=in_group, fit={"01": 0.9512, "02": 0.9034}, parameters={"model": "none"},
                        failed={"03": "sub-03_ses-1_T1w.nii.gz: not a readable NIfTI/MGZ image"})
    reports["group"] = group_report(out, group)
    return {"out": out, "results": results, "reports": reports, "group": group}


def _check_targets(page: Page, folder: Path) -> None:
    for target in page.targets:
        assert not target.startswith("/") and (folder / target).is_file(), target


def _check_figures(page: Page, folder: Path, figures: str) -> None:
    assert page.images
    for source in page.images:
        assert source.startswith(figures), source
        path = folder / source
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with PILImage.open(path) as figure:
            figure.verify()
        with PILImage.open(path) as figure:
            assert 150 <= figure.width <= 1200 and 80 <= figure.height <= 800


def test_participant_reports_show_every_session_with_figures_and_metrics(study):
    out = study["out"]
    for sub in ("01", "02"):
        path = study["reports"][sub]
        assert path == out / f"sub-{sub}.html"
        page = Page(path)
        _check_targets(page, out)
        _check_figures(page, out, f"sub-{sub}/figures/")
        assert {f"sub-{sub}_ses-1", f"sub-{sub}_ses-2", "summary", "template", "group", "methods"} <= page.ids
        registration = {f"sub-{sub}_ses-{ses}_desc-{kind}_T1w.png" for ses in (1, 2) for kind in ("before", "after")}
        assert {Path(source).name for source in page.images} == {
            f"sub-{sub}_desc-template_T1w.png", f"sub-{sub}_space-group_T1w.png", *registration,
            f"sub-{sub}_ses-2_desc-logjacobian_map.png"}  # session 1's map is 0: no figure
        text = page.all_text
        assert "0.9877" in text and "correlation_to_template" in text and "mean_abs_log_jacobian" in text
        change = study["results"][sub].sessions[1].metrics["mean_abs_log_jacobian"]
        assert f"{change:.4g}" in text and "No volume change" in text
        assert "RWCNet" in text and "arXiv:2302.02283" in text and not page.errors


def test_links_still_work_when_the_folder_is_moved(study, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(study["out"], moved)
    for name in ("sub-01.html", "group.html"):
        page = Page(moved / name)
        assert page.targets
        _check_targets(page, moved)


def test_errors_appear_in_a_red_box_escaped_and_a_missing_file_does_not_stop_the_report(study, tmp_path):
    result = study["results"]["01"]
    broken = SessionResult("3", t1w=tmp_path / "missing_T1w.nii.gz", registered=result.sessions[0].registered,
                           jacobian=None, log_jacobian=None, metrics={})
    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    moved = lambda path: out / Path(path).relative_to(study["out"])  # noqa: E731
    report = participant_report(out, ParticipantResult(
        "01", moved(result.template), [*result.sessions[:1], broken], errors=["registration failed: <b>boom</b>"]))
    page = Page(report)
    errors = " ".join(page.errors)
    assert "registration failed: <b>boom</b>" in errors and "b" not in page.tags  # shown as text, not markup
    assert "missing_T1w.nii.gz: file not found" in errors
    assert "sub-01_ses-3" in page.ids
    _check_targets(page, out)


def test_a_participant_that_failed_early_gets_a_report_with_its_error(tmp_path):
    report = participant_report(tmp_path, ParticipantResult("07", template=None, sessions=[],
                                                            errors=["sub-07: no structural image found"]))
    page = Page(report)
    assert report == tmp_path / "sub-07.html"
    assert "sub-07: no structural image found" in " ".join(page.errors) and not page.images


def test_single_session_participant_has_no_change_map(study, tmp_path):
    session = study["results"]["02"].sessions[0]
    out = tmp_path / "single"
    template = save_image(load_image(session.registered), out / "sub-02" / "anat" / "sub-02_desc-template_T1w.nii.gz")
    report = participant_report(out, ParticipantResult("02", template, [SessionResult(
        None, session.t1w, template, jacobian=None, log_jacobian=None, metrics={})]))
    page = Page(report)
    assert {Path(source).name for source in page.images} == {
        "sub-02_desc-template_T1w.png", "sub-02_desc-before_T1w.png", "sub-02_desc-after_T1w.png"}
    assert "No volume-change map: a single session." in page.all_text
    _check_targets(page, out)


def test_group_report_shows_template_iterations_convergence_fit_and_failures(study):
    out, group = study["out"], study["group"]
    path = study["reports"]["group"]
    assert path == out / "group.html"
    page = Page(path)
    _check_targets(page, out)
    _check_figures(page, out, "figures/")
    assert {Path(source).name for source in page.images} == {
        "desc-template_T1w.png", "desc-iterations_T1w.png", "desc-convergence_plot.png", "desc-fit_plot.png",
        "sub-01_space-group_T1w.png", "sub-02_space-group_T1w.png"}
    assert {"sub-01.html", "sub-02.html", "tpl-demo/tpl-demo_T1w.nii.gz"} <= set(page.targets)
    text = page.all_text
    assert "1.25" in text and "0.375" in text and "0.9512" in text and "0.9034" in text
    assert "sub-03: " + group.failed["03"] in " ".join(page.errors)


def test_tissue_means_recover_three_intensity_classes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(mean, 0.03, count) for mean, count in ((0.3, 2000), (0.6, 5000), (0.85, 4000))])
    assert np.allclose(_tissue_means(rng.permutation(values)), [0.3, 0.6, 0.85], atol=0.01)


def test_slices_cut_through_the_centre_of_the_image_in_world_coordinates():
    data = np.zeros((9, 9, 9), np.float32)
    data[6, 2, 4] = data[6, 4, 4] = 1.0
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 7.0]
    centre = _centre(Image(data, affine))
    assert np.allclose(centre, Grid(data.shape, affine).voxel_to_world(np.array([6.0, 3.0, 4.0])))


def test_citation_text_is_markdown_with_the_references():
    text = citation_text()
    assert text.startswith("# Methods boilerplate") and "## References" in text
    assert "Recurrence With Correlation Network" in text and "Sivan" in text
    assert f"rwcflow {rwcflow.__version__}" in text
