"""HTML reports of the BIDS App on real images: the demo dataset (2 participants × 2 sessions, 6 mm) and
maps computed from its ground truth; links and figures, sections, metrics, change maps and their clusters,
error boxes, a moved folder; the methods text generated from the options."""

from __future__ import annotations

import dataclasses
import hashlib
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
from rwcflow.bids_app.options import RunOptions
from rwcflow.bids_app.reports import (WORKS, Cluster, GroupResult, ParticipantResult, SessionResult, _centre,
                                      _tissue_means, change_clusters, citation_text, group_report, methods,
                                      participant_report)
from rwcflow.bids_app.spaces import TemplateChoice
from rwcflow.checkpoint import default_model_path
from rwcflow.io import Grid, Image, load_image, read_nibabel, save_image, resample
from rwcflow.maps import average_images, invert_displacement, jacobian_from_world_field, resample_displacement

COMMAND = "rwcflow raw derivatives participant --participant-label 01 02 --model default"


def parameters(**options) -> dict:
    """The parameters a run records (RunOptions.parameters()) with ``options``, template ``demo``."""
    return RunOptions(template=TemplateChoice("demo", None), work_dir=Path("work"), **options).parameters()


class Page(HTMLParser):
    """An HTML page's link targets, element ids, text, the text inside its red error boxes and the text of
    each section (by id)."""

    def __init__(self, path: Path):
        super().__init__()
        self.targets, self.images, self.ids, self.tags, self.text, self.errors = [], [], set(), [], [], []
        self.sections, self._open_sections = {}, []
        self._error_depth = 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self._open_sections.append(attributes.get("id"))
            self.sections.setdefault(attributes.get("id"), [])
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
        if tag == "section":
            self._open_sections.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._error_depth:
            self.errors.append(data)
        for section in self._open_sections:
            self.sections[section].append(data)

    def section(self, name: str) -> str:
        return " ".join(self.sections[name])

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A derivatives folder as the participant level leaves it, with maps computed from the demo's truth:
    session 1 is the template, session 2 is brought onto it by its known repositioning, and its Jacobian is
    that of the true session-1 -> session-2 mapping (the inverse of the truth's session-2 -> session-1 field;
    0.95 in the shrunk sphere); the group template is the demo's MNI152 brain."""
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
        to_first, second_grid = transforms.read_displacement_field(truth_dir / f"sub-{sub}" / ses2["xfm"])
        to_second = resample_displacement(invert_displacement(to_first, second_grid), second_grid, first.grid)
        jacobians = [np.ones(first.data.shape, np.float32),
                     jacobian_from_world_field(to_second, first.grid).astype(np.float32)]
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
                                         group_registered=in_group[sub], parameters=parameters(), command=COMMAND)
    reports = {sub: participant_report(out, result) for sub, result in results.items()}
    initial = save_image(average_images([load_image(path) for path in in_group.values()]),
                         out / "tpl-demo" / "tpl-demo_desc-iteration0_T1w.nii.gz")
    group = GroupResult(template=group_template, iteration_templates=[initial, group_template],
                        convergence=[{"update": 1, "update_norm_mm": 1.25}, {"update": 2, "update_norm_mm": 0.375}],
                        participants=in_group, fit={"01": 0.9512, "02": 0.9034}, command=COMMAND,
                        parameters=parameters(model="none", io_iters=0, refine_iters=0),
                        failed={"03": "sub-03_ses-1_T1w.nii.gz: not a readable NIfTI/MGZ image"})
    reports["group"] = group_report(out, group)
    return {"out": out, "results": results, "reports": reports, "group": group, "truth": truth_dir}


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
        assert {f"sub-{sub}_ses-1", f"sub-{sub}_ses-2", "summary", "template", "change", f"sub-{sub}_ses-2_change",
                "group", "methods"} <= page.ids
        registration = {f"sub-{sub}_ses-{ses}_desc-{kind}_T1w.png" for ses in (1, 2) for kind in ("before", "after")}
        assert {Path(source).name for source in page.images} == {
            f"sub-{sub}_desc-template_T1w.png", f"sub-{sub}_space-group_T1w.png", *registration,
            f"sub-{sub}_ses-2_desc-change_map.png"}  # one change map: session 2 against session 1
        assert f"sub-{sub}/figures/sub-{sub}_ses-2_desc-change_map.png" in page.images
        text = page.all_text
        assert "0.9877" in text and "correlation_to_template" in text and "mean_abs_log_jacobian" in text
        change = study["results"][sub].sessions[1].metrics["mean_abs_log_jacobian"]
        assert f"{change:.4g}" in text
        assert "RWCNet" in text and "arXiv:2302.02283" in text and not page.errors


def test_change_map_cuts_through_the_true_atrophy_and_its_largest_loss_cluster_peaks_there(study):
    """Session 2's true Jacobian (session 1's is 1): the sphere around the left hippocampus loses 5 % of its
    volume, in the world of session 1 = the template here; the cuts and the largest loss cluster's peak lie
    within 2 voxels of its centre, and the report's table shows that cluster first."""
    truth_dir = study["truth"]
    for sub in ("01", "02"):
        truth = json.loads((truth_dir / f"sub-{sub}" / f"sub-{sub}_truth.json").read_text())
        centre = np.array(truth["atrophy"]["sessions"]["ses-1"]["centre_mm"])
        first, second = (read_nibabel(session.log_jacobian) for session in study["results"][sub].sessions)
        grid = Grid(second[1].shape, second[0].affine)
        clusters = change_clusters(second[1] - first[1], grid)
        losses = [cluster for cluster in clusters if cluster.sign < 0]
        two_voxels = 2 * float(np.max(grid.spacing))
        assert losses and np.linalg.norm(np.array(losses[0].peak_mm) - centre) <= two_voxels
        assert -0.06 < losses[0].peak < -0.04  # log(0.95) = -0.0513 inside the sphere
        page = Page(study["reports"][sub])
        change = page.section("change")
        rows = change.split("mean Δ log J", 1)[1]
        assert rows.split()[0] == "loss" and "({:.1f}, {:.1f}, {:.1f})".format(*losses[0].peak_mm) in rows
        cut = change.split("cuts through (", 1)[1].split(")", 1)[0]
        assert np.linalg.norm(np.array([float(c) for c in cut.split(",")]) - centre) <= two_voxels


def test_change_clusters_on_a_known_map():
    """A loss cube (3×3×3 voxels at -0.05, its centre -0.08) with a voxel touching it at a corner only
    (26-connectivity: the same cluster), a gain box (2×2×4 at +0.03, one voxel +0.06), a lone loss voxel, and
    values under the threshold; voxels of 2 × 3 × 1.5 mm on an affine with a translation."""
    affine = np.diag([2.0, 3.0, 1.5, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    grid = Grid((20, 20, 20), affine)
    delta = np.zeros(grid.shape)
    delta[2:5, 2:5, 2:5] = -0.05
    delta[3, 3, 3] = -0.08
    delta[5, 5, 5] = -0.03
    delta[10:12, 10:12, 10:14] = 0.03
    delta[11, 10, 12] = 0.06
    delta[15, 2, 2] = -0.021
    delta[15, 15, 15] = -0.019
    delta[2, 15, 15] = 0.01
    world = lambda *voxel: tuple(float(c) for c in grid.voxel_to_world(np.array(voxel, dtype=float)))  # noqa: E731
    exactly = lambda value: pytest.approx(value, rel=1e-12)  # noqa: E731
    assert change_clusters(delta, grid, threshold=0.02) == [
        Cluster(-1, 28, exactly(28 * 9.0), world(3, 3, 3), -0.08, exactly((26 * -0.05 - 0.08 - 0.03) / 28)),
        Cluster(-1, 1, exactly(9.0), world(15, 2, 2), -0.021, exactly(-0.021)),
        Cluster(1, 16, exactly(16 * 9.0), world(11, 10, 12), 0.06, exactly((15 * 0.03 + 0.06) / 16)),
    ]
    assert world(3, 3, 3) == (-14.0, 19.0, 9.5)
    assert [cluster.kind for cluster in change_clusters(delta, grid, threshold=0.02, largest=1)] == ["loss", "gain"]
    assert change_clusters(delta, grid, threshold=0.1) == []


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


def test_sessions_without_change_get_a_note_and_no_cluster(study, tmp_path):
    first, second = study["results"]["01"].sessions
    result = study["results"]["01"]
    report = participant_report(tmp_path, ParticipantResult(
        "01", result.template, [first, dataclasses.replace(second, log_jacobian=first.log_jacobian)]))
    page = Page(report)
    change = page.section("change")
    assert "No volume change" in change and "No cluster" in change
    assert not any(source.endswith("_desc-change_map.png") for source in page.images) and not page.errors
    assert "The options of this run were not recorded" in page.section("methods")


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
    text = citation_text(parameters())
    assert text.startswith("# Methods boilerplate") and "## References" in text
    assert "Recurrence With Correlation Network" in text and "Sivan" in text
    assert f"rwcflow {rwcflow.__version__}" in text
    paragraphs, references = methods(parameters())
    assert all(paragraph in text for paragraph in paragraphs)
    assert text.endswith("## References\n\n" + "\n".join(f"{n}. {r}" for n, r in enumerate(references, 1)) + "\n")


@pytest.mark.parametrize("options", [{}, {"model": "none", "io_iters": 0, "refine_iters": 0},
                                     {"model": "none"}, {"io_iters": 0}, {"model": "my_model.safetensors"},
                                     {"io_iters": 7, "refine_iters": 0}])
def test_methods_cite_exactly_the_works_they_name(options):
    paragraphs, references = methods(parameters(**options))
    text = " ".join(paragraphs)
    cited = [key for key, (citation, _) in WORKS.items() if citation in text]
    assert sorted(references) == sorted(WORKS[key][1] for key in cited)
    assert len(set(references)) == len(references)


def test_methods_follow_the_options():
    """With the defaults, RWCNet (shipped weights, their sha256), instance optimisation and the groupwise
    refinement are described and cited; with no network, no instance optimisation and no refinement, none
    of them is cited."""
    default = parameters()
    paragraphs, references = methods(default)
    text, listed = " ".join(paragraphs), " ".join(references)
    sha256 = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert default["model_sha256"] == sha256 and sha256 in text and "weights shipped with rwcflow" in text
    for work in ("Recurrence With Correlation Network", "RAFT", "Fast 3D registration", "self-similarities",
                 "Bias in estimation of hippocampal atrophy", "optimal template effect"):
        assert work in listed, work
    assert "20 Adam steps (rwcflow's default) on a MIND-SSC" in text and f"refined jointly ({default['refine_iters']} L-BFGS iterations)" in text
    assert "half-way between them" in text and f"{default['group_iterations']} template updates" in text

    paragraphs, references = methods(parameters(model="none", io_iters=0, refine_iters=0))
    text, listed = " ".join(paragraphs), " ".join(references)
    for work in ("arXiv:2302.02283", "RAFT", "Fast 3D registration", "self-similarities", "Bias in estimation"):
        assert work not in listed, work
    assert "optimal template effect" in listed and "BIDS apps" in listed and "inverse consistent" in listed
    assert "affine pre-alignment only" in text and "--refine-iters 0" in text and "sha256" not in text

    paragraphs, _ = methods(parameters(model="none", io_iters=30))
    assert "30 Adam steps per level" in " ".join(paragraphs)
    paragraphs, _ = methods(parameters(model="/models/my_model.safetensors", io_iters=0))
    assert "model file my_model.safetensors" in " ".join(paragraphs) and "without instance optimisation" in paragraphs[0]


def test_reports_state_the_command_the_model_sha256_and_the_methods_of_the_run(study):
    sha256 = parameters()["model_sha256"]
    participant = Page(study["reports"]["01"])
    summary = participant.section("summary")
    assert COMMAND in summary and sha256 in summary
    methods_text = participant.section("methods")
    assert all(" ".join(paragraph.split()) in " ".join(methods_text.split())
               for paragraph in methods(parameters())[0])
    group = Page(study["reports"]["group"])
    assert COMMAND in group.section("summary")
    methods_text = group.section("methods")
    assert "affine pre-alignment only" in methods_text and "arXiv:2302.02283" not in methods_text
