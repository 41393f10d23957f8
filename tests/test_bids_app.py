"""The BIDS App end to end: ``rwcflow`` on a generated dataset (2 participants × 2 sessions, 6 mm, run
once per test session: tests/conftest.py's ``demo_study``), the participant then the group level;
names, geometry, sidecars, dataset description, reports; bad input; a re-run that resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demo_study import LOCAL, digests, jobs_started

import rwcflow
from rwcflow import transforms
from rwcflow.bids_app.cli import main
from rwcflow.bids_app.demo import write_demo_dataset
from rwcflow.bids_app.derivatives import dataset_description
from rwcflow.io import load_image

SESSION_FILES = ["from-orig_to-T1w_mode-image_xfm.nii.gz", "from-T1w_to-orig_mode-image_xfm.nii.gz",
                 "space-T1w_desc-registered_T1w.nii.gz", "space-T1w_jacobian.nii.gz",
                 "space-T1w_desc-log_jacobian.nii.gz"]


def test_both_levels_succeed_and_leave_the_input_untouched(demo_study):
    assert demo_study["codes"] == (0, 0)
    assert digests(demo_study["raw"]) == demo_study["raw_digests"]


def test_participant_derivatives_have_bids_names_and_geometry(demo_study):
    out = demo_study["out"]
    for sub in ("01", "02"):
        template = load_image(out / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-template_T1w.nii.gz")
        for ses in ("1", "2"):
            folder = out / f"sub-{sub}" / f"ses-{ses}" / "anat"
            for name in SESSION_FILES:
                path = folder / f"sub-{sub}_ses-{ses}_{name}"
                assert path.is_file(), path
                sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
                assert sidecar["Sources"] == [f"bids:raw:sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}_T1w.nii.gz"]
            # every map lies on the template's grid; the transforms are ITK fields on it
            registered = load_image(folder / f"sub-{sub}_ses-{ses}_space-T1w_desc-registered_T1w.nii.gz")
            assert registered.grid == template.grid
            for name in SESSION_FILES[:2]:
                disp, grid = transforms.read_displacement_field(folder / f"sub-{sub}_ses-{ses}_{name}")
                assert grid == template.grid and np.isfinite(disp).all()
            jacobian = nib.load(folder / f"sub-{sub}_ses-{ses}_space-T1w_jacobian.nii.gz")
            assert np.allclose(jacobian.affine, template.affine) and (np.asanyarray(jacobian.dataobj) > 0).mean() > 0.99
            # the registered session fits the template
            inside = template.data > 0.1 * template.data.max()
            assert np.corrcoef(registered.data[inside], template.data[inside])[0, 1] > 0.8


def test_group_derivatives(demo_study):
    out = demo_study["out"]
    template = load_image(out / "tpl-unbiased" / "tpl-unbiased_T1w.nii.gz")
    assert json.loads((out / "tpl-unbiased" / "tpl-unbiased_T1w.json").read_text())["Sources"] == [
        f"bids::sub-{sub}/anat/sub-{sub}_desc-template_T1w.nii.gz" for sub in ("01", "02")]
    assert (out / "tpl-unbiased" / "tpl-unbiased_desc-iteration0_T1w.nii.gz").is_file()
    updates = json.loads((out / "tpl-unbiased" / "tpl-unbiased_desc-convergence_log.json").read_text())["updates"]
    assert [update["update"] for update in updates] == [1]
    for sub in ("01", "02"):
        anat = out / f"sub-{sub}" / "anat"
        disp, grid = transforms.read_displacement_field(anat / f"sub-{sub}_from-T1w_to-unbiased_mode-image_xfm.nii.gz")
        assert grid == template.grid
        assert load_image(anat / f"sub-{sub}_space-unbiased_desc-registered_T1w.nii.gz").grid == template.grid


def test_dataset_description_logs_and_citation(demo_study):
    out = demo_study["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "rwcflow" and description["GeneratedBy"][0]["Version"]
    assert description["DatasetLinks"]["raw"] == demo_study["raw"].resolve().as_uri()
    # not run in a container (whatever files such as /.dockerenv say), and the demo has no DOI
    assert "Container" not in description["GeneratedBy"][0] and "SourceDatasets" not in description
    # the methods text of the options used: instance optimisation without a network, so no RWCNet reference
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "instance optimisation alone" in citation and "Siebert H, Hansen L, Heinrich MP" in citation
    assert "Recurrence With Correlation Network for Medical Image Registration" not in citation
    logs = sorted((out / "logs").glob("rwcflow-*.log"))
    assert {path.name.split("-")[1] for path in logs} == {"participant", "group"}
    # progress per participant and per job, naming the sessions
    assert "[2/2] sub-02" in _log(out)
    assert "groupwise refinement of sub-02_ses-1_T1w.nii.gz, sub-02_ses-2_T1w.nii.gz: done in " in _log(out)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for key in ("src", "href", "data"):
            value = attributes.get(key)
            if value and not value.startswith(("http", "#", "mailto:", "data:")):
                self.targets.append(value)


@pytest.mark.parametrize("report", ["sub-01.html", "sub-02.html", "group.html"])
def test_reports_reference_files_that_exist(demo_study, report):
    path = demo_study["out"] / report
    parser = _Links()
    parser.feed(path.read_text())
    assert parser.targets, f"{report} shows no figure"
    for target in parser.targets:
        assert (path.parent / target).is_file(), target


def test_an_unreadable_image_is_bad_input_refused_before_any_work(demo_study, tmp_path, capsys):
    """Bad input stops the run (exit 2), naming the file, before anything is written; a participant whose
    processing fails does not stop the others (tests/test_bids_app_failures.py)."""
    raw = tmp_path / "raw"
    shutil.copytree(demo_study["raw"], raw)
    broken = raw / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii.gz"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main([str(raw), str(out), "participant", "-w", str(tmp_path / "work"), *LOCAL])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rwcflow: error: ") and "sub-02_ses-2_T1w.nii.gz: not a readable" in line
    assert not out.exists() and not (tmp_path / "work").exists()


def test_rerun_resumes_and_same_seed_gives_identical_outputs(demo_study, tmp_path):
    first = {name: digest for name, digest in digests(demo_study["out"]).items()
             if name.startswith("sub-01/") and name.endswith(".nii.gz") and "unbiased" not in name}
    # the same work folder: every job is served from Pydra's cache (none is logged as started; the jobs
    # log into the run's log file)
    resumed = tmp_path / "resumed"
    assert main([str(demo_study["raw"]), str(resumed), "participant", "-w", str(demo_study["work"]),
                 "--participant-label", "01", *LOCAL]) == 0
    assert jobs_started(_log(resumed)) == []
    assert {name: d for name, d in digests(resumed).items() if name.endswith(".nii.gz")} == first
    # a fresh work folder and the same seed: computed again, to the same bytes
    fresh = tmp_path / "fresh"
    assert main([str(demo_study["raw"]), str(fresh), "participant", "-w", str(tmp_path / "work"),
                 "--participant-label", "sub-01", "--random-seed", "0", *LOCAL]) == 0
    assert [line.split(" INFO ")[-1] for line in jobs_started(_log(fresh))] == [
        "rigid midspace of sub-01_ses-1_T1w.nii.gz, sub-01_ses-2_T1w.nii.gz: aligning",
        "groupwise refinement of sub-01_ses-1_T1w.nii.gz, sub-01_ses-2_T1w.nii.gz: refining"]
    assert {name: d for name, d in digests(fresh).items() if name.endswith(".nii.gz")} == first


def _log(out: Path) -> str:
    return "".join(path.read_text() for path in (out / "logs").glob("rwcflow-*.log"))


def test_single_session_registered_to_a_given_template(demo_study, tmp_path):
    """One session per participant and ``--template FILE``: each session passes through as its own
    template and is registered into the given space (here sub-02's first session, copied out)."""
    template = tmp_path / "tpl-demo_T1w.nii.gz"
    shutil.copyfile(demo_study["raw"] / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz", template)
    out = tmp_path / "out"
    assert main([str(demo_study["raw"]), str(out), "participant", "-w", str(tmp_path / "work"), "--session-label", "1",
                 "--participant-label", "01", "--template", str(template), *LOCAL]) == 0
    folder = out / "sub-01" / "ses-1" / "anat"
    grid = load_image(template).grid
    disp, field_grid = transforms.read_displacement_field(folder / "sub-01_ses-1_from-orig_to-demo_mode-image_xfm.nii.gz")
    assert field_grid == grid
    registered = load_image(folder / "sub-01_ses-1_space-demo_desc-registered_T1w.nii.gz")
    assert registered.grid == grid
    reference = load_image(template)
    inside = reference.data > 0.1 * reference.data.max()
    assert np.corrcoef(registered.data[inside], reference.data[inside])[0, 1] > 0.8
    # no change maps to speak of for a single session: J = 1
    jacobian = nib.load(folder / "sub-01_ses-1_space-T1w_jacobian.nii.gz").get_fdata()
    np.testing.assert_allclose(jacobian, 1.0, atol=1e-5)
    assert (out / "sub-01" / "anat" / "sub-01_from-T1w_to-demo_mode-image_xfm.nii.gz").is_file()


@pytest.mark.smoke
def test_demo_participant_level_with_the_shipped_model(tmp_path):
    """The README's main job, small: the demo's participant level with the default model (the shipped
    network, then instance optimisation, registering the within-subject template to a given group
    template: the demo's own template brain), jobs in two processes."""
    raw = write_demo_dataset(tmp_path / "raw", participants=1, sessions=2, resolution_mm=6.0)
    out = tmp_path / "out"
    group = raw / "sourcedata" / "truth" / "tpl-MNI152NLin2009aSym_desc-brain_T1w.nii.gz"
    assert main([str(raw), str(out), "participant", "-w", str(tmp_path / "work"), "--io-iters", "5",
                 "--refine-iters", "20", "--template", str(group), "--nprocs", "2", "--omp-nthreads", "1",
                 "--skip-bids-validation",
                 "--device", "cpu"]) == 0
    assert list((out / "sub-01" / "anat").glob("sub-01_from-T1w_to-*_mode-image_xfm.nii.gz"))
    for session in ("1", "2"):
        anat = out / "sub-01" / f"ses-{session}" / "anat"
        assert load_image(anat / f"sub-01_ses-{session}_space-T1w_desc-log_jacobian.nii.gz").grid == \
            load_image(out / "sub-01" / "anat" / "sub-01_desc-template_T1w.nii.gz").grid
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_desc-template_T1w.json").read_text())
    assert sidecar["rwcflow"]["model"] == "default"
    shipped = Path(rwcflow.__file__).parent / "data" / "default.safetensors"
    assert sidecar["rwcflow"]["model_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_provenance_names_the_container_and_the_source_dataset_it_is_told(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps(
        {"Name": "study", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.18112/openneuro.ds000001.v1.0.0",
         "DatasetVersion": "1.0.0"}))
    monkeypatch.delenv("SINGULARITY_CONTAINER", raising=False)
    monkeypatch.setenv("APPTAINER_CONTAINER", "/scratch/containers/rwcflow.sif")  # as Apptainer sets it inside
    description = json.loads(dataset_description(tmp_path / "out", raw).read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "apptainer", "Tag": rwcflow.__version__,
                                                          "URI": "/scratch/containers/rwcflow.sif"}
    assert description["SourceDatasets"] == [{"DOI": "doi:10.18112/openneuro.ds000001.v1.0.0", "Version": "1.0.0"}]
