"""A participant's derivatives appear together: written into a staging copy of its folder that replaces
the folder in one rename, keeping the old folder's other files; a failure part-way leaves the old folder
as it was; what a killed run left is cleared (or put back) by the next."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rwcflow.bids_app.derivatives import publish_together, remove_stale_staging


def _tree(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def out(tmp_path) -> Path:
    """A participant folder from an earlier run: its own output, a group-level output and a crash file."""
    out = tmp_path / "out"
    for name, text in {"sub-01/anat/sub-01_desc-template_T1w.nii.gz": "old template",
                       "sub-01/anat/sub-01_space-unbiased_desc-registered_T1w.nii.gz": "group level's",
                       "sub-01/log/20261207-010101_a/crash-register.txt": "traceback"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


def test_a_set_replaces_its_files_and_keeps_the_others(out, tmp_path):
    produced = [tmp_path / "template.nii.gz", tmp_path / "xfm.nii.gz"]
    for path, text in zip(produced, ("new template", "new xfm")):
        path.write_text(text)
    kept = out / "sub-01" / "anat" / "sub-01_space-unbiased_desc-registered_T1w.nii.gz"
    inode = kept.stat().st_ino
    publish_together(out, "sub-01", [
        (produced[0], out / "sub-01" / "anat" / "sub-01_desc-template_T1w.nii.gz", {"Description": "t"}),
        (produced[1], out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_xfm.nii.gz", None)])
    assert (out / "sub-01" / "anat" / "sub-01_desc-template_T1w.nii.gz").read_text() == "new template"
    assert (out / "sub-01" / "anat" / "sub-01_desc-template_T1w.json").is_file()
    assert (out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_xfm.nii.gz").read_text() == "new xfm"
    assert kept.read_text() == "group level's" and kept.stat().st_ino == inode  # carried over as a hard link
    assert (out / "sub-01" / "log" / "20261207-010101_a" / "crash-register.txt").read_text() == "traceback"
    assert sorted(path.name for path in out.iterdir()) == ["sub-01"]  # no staging, no old folder


def test_a_failure_part_way_leaves_the_old_folder_as_it_was(out, tmp_path):
    before = _tree(out)
    (tmp_path / "first.nii.gz").write_text("new")
    with pytest.raises(FileNotFoundError):
        publish_together(out, "sub-01", [
            (tmp_path / "first.nii.gz", out / "sub-01" / "anat" / "sub-01_desc-template_T1w.nii.gz", None),
            (tmp_path / "gone.nii.gz", out / "sub-01" / "anat" / "sub-01_jacobian.nii.gz", None)])
    assert _tree(out) == before


def test_what_a_killed_publication_left_is_cleared_or_put_back(out):
    before = _tree(out)
    # killed between the two renames: the old folder set aside, the new one not moved in
    os.rename(out / "sub-01", out / ".sub-01.0123456789ab.old")
    (out / ".sub-01.0123456789ab.staging" / "anat").mkdir(parents=True)
    (out / ".sub-01.0123456789ab.staging" / "anat" / "half.nii.gz").write_text("half")
    assert len(remove_stale_staging(out, "01")) == 2
    assert _tree(out) == before and sorted(path.name for path in out.iterdir()) == ["sub-01"]
    # an old folder left beside a folder in place is removed
    (out / ".sub-01.ba9876543210.old").mkdir()
    remove_stale_staging(out, "01")
    assert _tree(out) == before and sorted(path.name for path in out.iterdir()) == ["sub-01"]
