"""The BIDS App's input: which participants, sessions and images are selected, the template choices,
and BIDS validation. Bad input (exit code 2, one line, nothing written) is tested in test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

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
