"""The BIDS App's checks of its input: each bad input stops with one line naming the file or folder and
the problem (exit code 2), before anything is run or written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rwcflow.bids_app import dataset
from rwcflow.bids_app.cli import main
from rwcflow.bids_app.spaces import BUILTIN, UNBIASED, resolve_template


def _t1w(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(1, 100, (8, 9, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


@pytest.fixture
def raw(tmp_path) -> Path:
    """A tiny BIDS dataset: sub-01 (ses-1, ses-2), sub-02 (ses-1)."""
    root = tmp_path / "raw"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    for sub, ses in (("01", "1"), ("01", "2"), ("02", "1")):
        _t1w(root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz", seed=int(sub + ses))
    return root


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    code = main([*argv, "--skip-bids-validation"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("rwcflow: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_not_a_bids_folder(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nowhere"), str(tmp_path / "out"), "participant"], "nowhere", "not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, [str(empty), str(tmp_path / "out"), "participant"], "missing dataset_description.json")
    assert not (tmp_path / "out").exists()


def test_broken_dataset_description(raw, tmp_path, capsys):
    (raw / "dataset_description.json").write_text("{not json")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant"], "dataset_description.json", "not valid JSON")
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "no version"}))
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant"], "BIDSVersion")


def test_output_or_work_folder_inside_the_dataset(raw, tmp_path, capsys):
    before = _snapshot(raw)
    _fails(capsys, [str(raw), str(raw / "derivatives" / "rwcflow"), "participant"], "output folder", "inside the input")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "-w", str(raw / "work")], "work folder")
    assert _snapshot(raw) == before  # nothing written into the input


def test_unknown_participant_or_session(raw, tmp_path, capsys):
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--participant-label", "sub-01", "07"],
           "participant(s) 07 not found", "01, 02")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--session-label", "ses-9"], "session(s) 9 not found")


def test_no_structural_image(raw, tmp_path, capsys):
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--modality", "T2w"], "no T2w images found")
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)],
           "no T1w images found")


def test_bad_filter_file(raw, tmp_path, capsys):
    filters = tmp_path / "filters.json"
    filters.write_text("[1, 2")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)],
           "filters.json", "not valid JSON")
    filters.write_text(json.dumps({"bold": {"task": "rest"}}))
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)],
           "unknown image kind")


def test_bad_template(raw, tmp_path, capsys):
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--template", str(tmp_path / "tpl.nii.gz")],
           "tpl.nii.gz", "template not found")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--template", f"{BUILTIN}:res-9"], "modifier")


def test_selection_and_labels(raw):
    participants = dataset.find_participants(raw, participants=["sub-01"], sessions=["2"])
    assert [p.label for p in participants] == ["01"]
    assert [image.name for image in participants[0].images] == ["sub-01_ses-2_T1w.nii.gz"]
    everyone = dataset.find_participants(raw)
    assert [(p.label, p.sessions) for p in everyone] == [("01", ["1", "2"]), ("02", ["1"])]
    assert dataset.source_prefix(Path("sub-01_ses-2_run-1_T1w.nii.gz")) == "sub-01_ses-2_run-1"


def test_template_choices(tmp_path):
    assert resolve_template(UNBIASED, tmp_path).path is None
    given = resolve_template(str(_t1w(tmp_path / "tpl-OASIS30_T1w.nii.gz")), tmp_path)
    assert given.name == "OASIS30"
    builtin = resolve_template(f"{BUILTIN}:res-2:desc-brain", tmp_path)
    image = nib.load(builtin.path)
    assert builtin.name == BUILTIN and image.shape == (99, 117, 95)
    # MNI space: the world origin (the anterior commissure) lies inside the brain
    centre = np.linalg.inv(image.affine) @ np.array([0.0, 0.0, 0.0, 1.0])
    assert image.get_fdata()[tuple(np.round(centre[:3]).astype(int))] > 0


def test_bids_validation_refuses_files_outside_bids_unless_skipped(raw, tmp_path, capsys):
    (raw / "sub-01" / "ses-1" / "anat" / "T1.nii.gz").write_bytes(b"")
    code = main([str(raw), str(tmp_path / "out"), "participant", "--participant-label", "09"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "fails BIDS validation" in line and "sub-01/ses-1/anat/T1.nii.gz" in line
    # skipped, the run goes on to the next check (here: the unknown participant)
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--participant-label", "09"], "09 not found")


CORRUPT_MODEL = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"


@pytest.mark.parametrize(("options", "fragments"), [
    (["--model", "nope.safetensors"], ["nope.safetensors", "--model: no such model file"]),
    (["--model", "{corrupt}"], ["corrupt.safetensors", "not a readable safetensors model file"]),
    (["--model", "{folder}"], ["--model: not a file"]),
    (["--io-iters", "-5"], ["--io-iters: must be 0 or more, got -5"]),
    (["--nprocs", "0"], ["--nprocs: must be 1 or more, got 0"]),
    (["--omp-nthreads", "0"], ["--omp-nthreads: must be 1 or more"]),
    (["--longitudinal-iterations", "0"], ["--longitudinal-iterations: must be 1 or more"]),
    (["--group-iterations", "-1"], ["--group-iterations: must be 1 or more"]),
    (["--random-seed", "-3"], ["--random-seed: must be 0 or more"]),
    (["-w", "{file}"], ["a-file", "--work-dir: is a file, not a folder"]),
    (["-w", "{under_file}"], ["--work-dir: lies under the file", "a-file"]),
])
def test_bad_options_stop_before_anything_is_written(raw, tmp_path, capsys, options, fragments):
    (tmp_path / "corrupt.safetensors").write_bytes(CORRUPT_MODEL)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    values = {"corrupt": tmp_path / "corrupt.safetensors", "folder": tmp_path / "folder.safetensors",
              "file": tmp_path / "a-file", "under_file": tmp_path / "a-file" / "work"}
    options = [option.format(**values) for option in options]
    before = sorted(tmp_path.rglob("*"))
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", *options], *fragments)
    assert sorted(tmp_path.rglob("*")) == before  # no output or work folder, no log


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_a_machine_without_one(raw, tmp_path, capsys):
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant", "--device", "cuda"],
           "--device: CUDA was asked for but no CUDA device is available")
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file(raw, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    _fails(capsys, [str(raw), str(tmp_path / "out"), "participant"], "output folder: is a file, not a folder")
    _fails(capsys, [str(raw), str(tmp_path / "out" / "derivatives"), "participant"], "lies under the file")
