"""Bad input, end to end, for the three commands: ``rwcflow`` (the BIDS App), ``rwcflow-register`` and
``rwcflow-train``, each called in-process through its ``main(argv)`` on tiny real files.

One table: every row is one kind of bad input (a missing, unreadable or unsuitable file, a number out of
range, a device this machine lacks, an output or work folder that cannot be made or written, or lies
inside the input). The rules, checked for every row by :func:`assert_refused`: exit code 2; on stderr
exactly one line, ``<prog>: error: ...``, no traceback, naming the file or option and the problem; nothing
new in the test's folder (no output or work folder, no log); and every file that was there, the input
dataset or images included, byte for byte as it was. Rows needing a machine without a GPU, or root (to
mount a read-only file system), are skipped elsewhere. Usage errors that argparse reports (a missing
argument, a value that is not a number) are not rows: argparse prints its usage line with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rwcflow import cli as register_cli
from rwcflow import train
from rwcflow.bids_app import cli as app_cli
from rwcflow.checkpoint import FORMAT, FORMAT_VERSION
from rwcflow.models import RWCNet, RWCNetConfig, StageConfig

Maker = Callable[[Path], object]
"""Writes one file or folder of a case at the path it is given."""

SHAPE = (8, 9, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
VOLUME = np.random.default_rng(0).uniform(1, 100, SHAPE).astype(np.float32)
SHIFTED = AFFINE.copy()
SHIFTED[:3, 3] = 10.0  # the same grid, 10 mm away
T1W = "inputs/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"  # the App's cases replace this one
ONE_STAGE = RWCNetConfig.tiny(stages=(StageConfig(0.5, 2, 1, 1),))  # a network other than the tiny preset's
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only file system needs root")
YAML = pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="YAML configs need PyYAML")


def image(data: np.ndarray, affine: np.ndarray = AFFINE, *, halved: bool = False) -> Maker:
    """A NIfTI image of ``data``; ``halved``: its file cut to its first half (a truncated download)."""

    def make(path: Path) -> None:
        nib.save(nib.Nifti1Image(data, affine), path)
        if halved:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return make


def text(content: str) -> Maker:
    """A text file."""
    return lambda path: path.write_text(content)


def folder() -> Maker:
    """An empty folder (where a file is expected)."""
    return lambda path: path.mkdir()


def model(config: RWCNetConfig, weights: RWCNetConfig | None = None) -> Maker:
    """An rwcflow model file of a network of ``config``, holding the freshly initialised weights of a
    network of ``weights`` (default: ``config``)."""

    def make(path: Path) -> None:
        tensors = {name: value.contiguous() for name, value in RWCNet(weights or config).state_dict().items()}
        save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": FORMAT_VERSION,
                                                "config": json.dumps(config.to_dict())})

    return make


def safetensors(metadata: dict[str, str] | None) -> Maker:
    """A safetensors file of one unrelated tensor, with ``metadata``."""
    return lambda path: save_file({"weight": torch.zeros(2)}, str(path), metadata=metadata)


def train_config(**changes: object) -> Maker:
    """``rwcflow-train``'s tiny preset with ``changes``, as JSON."""
    return text(json.dumps({**train.preset("tiny").to_dict(), **changes}))


MODEL_FILES: list[tuple[str, Maker | None, str]] = [  # (kind, file, problem) of a model file option
    ("missing", None, "{option}: no such model file"),
    ("a folder", folder(), "{option}: not a file"),
    ("corrupt", text("\x08\x00\x00\x00\x00\x00\x00\x00{broken}"), "not a readable safetensors model file"),
    ("not an rwcflow model", safetensors(None), "not an rwcflow model file"),
    ("of an unknown format version", safetensors({"format": FORMAT, "format_version": "99"}),
     "model format version '99' is not supported"),
    ("with weights not matching its network", model(ONE_STAGE, replace(ONE_STAGE, flow_head_channels=8)),
     "weights do not match the network in its config: size mismatch"),
]


def _bids_dataset(root: Path) -> None:
    """sub-01 (ses-1, ses-2) and sub-02 (ses-1), one T1w each."""
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    for seed, (sub, ses) in enumerate((("01", "1"), ("01", "2"), ("02", "1"))):
        path = root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        image(VOLUME + seed)(path)


def _image_pair(root: Path) -> None:
    """``fixed.nii.gz`` and ``moving.nii.gz`` (the fixed image shifted by one voxel)."""
    root.mkdir()
    image(VOLUME)(root / "fixed.nii.gz")
    image(np.roll(VOLUME, 1, axis=0))(root / "moving.nii.gz")


def _train_config(root: Path) -> None:
    """``config.json``: the tiny preset."""
    root.mkdir()
    train_config()(root / "config.json")


@dataclass(frozen=True)
class Command:
    """A command: its name on stderr, its ``main``, its good inputs (written into ``inputs/``) and the
    good arguments (positional ones keyed by their name) that a case changes."""

    prog: str
    main: Callable[[Sequence[str]], int]
    inputs: Callable[[Path], None]
    arguments: dict[str, str | None]


APP = Command("rwcflow", app_cli.main, _bids_dataset,
              {"bids_dir": "inputs", "output_dir": "out", "level": "participant", "--skip-bids-validation": None})
REGISTER = Command("rwcflow-register", register_cli.main, _image_pair,
                   {"--fixed": "inputs/fixed.nii.gz", "--moving": "inputs/moving.nii.gz", "--out-dir": "out",
                    "--model": "none", "--io-iters": "2"})
TRAIN = Command("rwcflow-train", train.main, _train_config,
                {"config": "inputs/config.json", "out_dir": "run", "--quiet": None})


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the arguments changed (``None``: a flag), the words the error line must
    hold (the file or option, the problem), the files the case writes first (paths relative to the
    test's folder; one in ``inputs/`` replaces that input) and a folder to mount read-only."""

    command: Command
    kind: str
    changes: dict[str, str | None]
    fragments: tuple[str, ...]
    files: dict[str, Maker] = field(default_factory=dict)
    read_only: str | None = None

    def argv(self) -> list[str]:
        """The command's arguments with this case's changes."""
        argv: list[str] = []
        for key, value in {**self.command.arguments, **self.changes}.items():
            argv += [value] if not key.startswith("-") else [key] if value is None else [key, value]
        return argv


def case(command: Command, kind: str, changes: dict[str, str | None], *fragments: str,
         marks: pytest.MarkDecorator | tuple = (), **details) -> pytest.ParameterSet:
    """One row of the table, its test id ``<prog>:<kind>``."""
    return pytest.param(Case(command, kind, changes, fragments, **details), marks=marks,
                        id=f"{command.prog}:{kind.replace(' ', '-')}")


def model_cases(command: Command, option: str) -> list[pytest.ParameterSet]:
    """:data:`MODEL_FILES` given to ``command``'s ``option``."""
    return [case(command, f"{option} {kind}", {option: "model.safetensors"}, "model.safetensors",
                 problem.format(option=option), files={"model.safetensors": make} if make else {})
            for kind, make, problem in MODEL_FILES]


def folder_cases(command: Command, argument: str, name: str) -> list[pytest.ParameterSet]:
    """An output or work folder (``argument``, called ``name`` in the error) that is a file, lies under
    one, or lies on a read-only file system."""
    blocker = {"a-file": text("x")}
    return [
        case(command, f"{name} is a file", {argument: "a-file"}, "a-file", f"{name}: is a file, not a folder",
             files=blocker),
        case(command, f"{name} under a file", {argument: "a-file/sub"}, "a-file", f"{name}: lies under the file",
             files=blocker),
        case(command, f"{name} on a read-only file system", {argument: "ro/sub"}, "ro/sub",
             f"{name}: cannot write into", "read-only file system", read_only="ro", marks=ROOT),
    ]


def no_gpu_case(command: Command) -> pytest.ParameterSet:
    """``--device cuda`` on a machine without a GPU."""
    return case(command, "--device cuda without a GPU", {"--device": "cuda"},
                "--device: CUDA was asked for but no CUDA device is available", marks=NO_GPU)


APP_CASES = [
    # the dataset
    case(APP, "input folder missing", {"bids_dir": "nowhere"}, "nowhere", "not a folder"),
    case(APP, "no dataset_description.json", {"bids_dir": "empty"}, "empty", "missing dataset_description.json",
         files={"empty": folder()}),
    case(APP, "dataset_description.json not JSON", {}, "dataset_description.json", "not valid JSON",
         files={"inputs/dataset_description.json": text("{not json")}),
    case(APP, "dataset_description.json without BIDSVersion", {}, "dataset_description.json", "BIDSVersion",
         files={"inputs/dataset_description.json": text(json.dumps({"Name": "no version"}))}),
    # the output and work folders
    case(APP, "output folder is the input", {"output_dir": "inputs"}, "inputs: the output folder is inside the input"),
    case(APP, "output folder inside the input", {"output_dir": "inputs/derivatives/rwcflow"},
         "derivatives/rwcflow", "output folder is inside the input dataset"),
    case(APP, "work folder inside the input", {"-w": "inputs/work"}, "inputs/work",
         "work folder is inside the input dataset"),
    *folder_cases(APP, "output_dir", "output folder"),
    *folder_cases(APP, "-w", "--work-dir"),
    # the selection
    case(APP, "unknown participant", {"--participant-label": "07"}, "participant(s) 07 not found", "01, 02"),
    case(APP, "unknown session", {"--session-label": "ses-9"}, "session(s) 9 not found"),
    case(APP, "no images of --modality", {"--modality": "T2w"}, "no T2w images found"),
    case(APP, "filter file missing", {"--bids-filter-file": "filters.json"}, "filters.json", "file not found"),
    case(APP, "filter file not JSON", {"--bids-filter-file": "filters.json"}, "filters.json", "not valid JSON",
         files={"filters.json": text("[1, 2")}),
    case(APP, "filter file not a query", {"--bids-filter-file": "filters.json"}, "filters.json",
         'expected {"t1w"', files={"filters.json": text(json.dumps({"t1w": "mprage"}))}),
    case(APP, "filter file unknown key", {"--bids-filter-file": "filters.json"}, "filters.json",
         "unknown image kind(s) ['bold']", files={"filters.json": text(json.dumps({"bold": {"task": "rest"}}))}),
    case(APP, "filter selecting nothing", {"--bids-filter-file": "filters.json"}, "no T1w images found",
         files={"filters.json": text(json.dumps({"t1w": {"acquisition": "mprage"}}))}),
    # the template and the other options
    case(APP, "template file missing", {"--template": "tpl.nii.gz"}, "tpl.nii.gz", "template not found"),
    case(APP, "template file unreadable", {"--template": "tpl.nii.gz"}, "tpl.nii.gz", "not a readable",
         files={"tpl.nii.gz": text("not an image")}),
    case(APP, "built-in template unknown modifier", {"--template": "MNI152NLin2009aSym:res-9"},
         "MNI152NLin2009aSym:res-9", "unknown template modifier"),
    *model_cases(APP, "--model"),
    case(APP, "--io-iters negative", {"--io-iters": "-5"}, "--io-iters: must be 0 or more, got -5"),
    case(APP, "--nprocs 0", {"--nprocs": "0"}, "--nprocs: must be 1 or more, got 0"),
    case(APP, "--omp-nthreads 0", {"--omp-nthreads": "0"}, "--omp-nthreads: must be 1 or more, got 0"),
    case(APP, "--refine-iters negative", {"--refine-iters": "-1"}, "--refine-iters: must be 0 or more, got -1"),
    case(APP, "--group-iterations negative", {"--group-iterations": "-1"},
         "--group-iterations: must be 1 or more, got -1"),
    case(APP, "--random-seed negative", {"--random-seed": "-3"}, "--random-seed: must be 0 or more, got -3"),
    no_gpu_case(APP),
    # every selected T1w is read up front
    case(APP, "T1w truncated", {}, "sub-02_ses-1_T1w.nii.gz", "not a readable NIfTI/MGZ image",
         files={T1W: image(VOLUME, halved=True)}),
    case(APP, "T1w with several volumes", {}, "sub-02_ses-1_T1w.nii.gz", "holds 2 volumes",
         files={T1W: image(np.stack([VOLUME, VOLUME], -1))}),
    case(APP, "T1w all zeros", {}, "sub-02_ses-1_T1w.nii.gz", "image is all zeros",
         files={T1W: image(np.zeros(SHAPE, np.float32))}),
    case(APP, "T1w with NaN", {}, "sub-02_ses-1_T1w.nii.gz", "image contains NaN",
         files={T1W: image(np.where(VOLUME > 50, np.nan, VOLUME))}),
    case(APP, "T1w a text file", {}, "sub-02_ses-1_T1w.nii.gz", "not a readable NIfTI/MGZ image",
         files={T1W: text("not an image")}),
]

REGISTER_CASES = [
    case(REGISTER, "fixed image missing", {"--fixed": "absent.nii.gz"}, "absent.nii.gz", "file not found"),
    case(REGISTER, "moving image a text file", {"--moving": "bad.nii.gz"}, "bad.nii.gz",
         "not a readable NIfTI/MGZ image", files={"bad.nii.gz": text("not an image")}),
    case(REGISTER, "moving image truncated", {"--moving": "bad.nii.gz"}, "bad.nii.gz",
         "not a readable NIfTI/MGZ image", files={"bad.nii.gz": image(VOLUME, halved=True)}),
    case(REGISTER, "moving image a folder", {"--moving": "bad.nii.gz"}, "bad.nii.gz", "is a folder, not an image",
         files={"bad.nii.gz": folder()}),
    case(REGISTER, "moving image with several volumes", {"--moving": "bad.nii.gz"}, "bad.nii.gz", "holds 2 volumes",
         files={"bad.nii.gz": image(np.stack([VOLUME, VOLUME], -1))}),
    case(REGISTER, "fixed image 2-D", {"--fixed": "bad.nii.gz"}, "bad.nii.gz", "expected a 3-D image",
         files={"bad.nii.gz": image(VOLUME[..., 0])}),
    case(REGISTER, "fixed image all zeros", {"--fixed": "bad.nii.gz"}, "bad.nii.gz", "image is all zeros",
         files={"bad.nii.gz": image(np.zeros(SHAPE, np.float32))}),
    case(REGISTER, "fixed image with NaN", {"--fixed": "bad.nii.gz"}, "bad.nii.gz", "image contains NaN",
         files={"bad.nii.gz": image(np.where(VOLUME > 50, np.nan, VOLUME))}),
    case(REGISTER, "label map on another grid", {"--fixed-labels": "labels.nii.gz"}, "labels.nii.gz",
         "label map is on another grid", files={"labels.nii.gz": image((VOLUME > 50).astype(np.int16), SHIFTED)}),
    case(REGISTER, "label map of non-integer values", {"--moving-labels": "labels.nii.gz"}, "labels.nii.gz",
         "label map holds non-integer values", files={"labels.nii.gz": image(VOLUME / 7)}),
    case(REGISTER, "mask on another grid", {"--fixed-mask": "mask.nii.gz"}, "mask.nii.gz",
         "mask is on another grid", files={"mask.nii.gz": image((VOLUME > 50).astype(np.uint8), SHIFTED)}),
    *model_cases(REGISTER, "--model"),
    case(REGISTER, "--io-iters negative", {"--io-iters": "-5"}, "--io-iters: must be 0 or more, got -5"),
    *folder_cases(REGISTER, "--out-dir", "--out-dir"),
    no_gpu_case(REGISTER),
]

TRAIN_CASES = [
    case(TRAIN, "config file missing", {"config": "absent.json"}, "absent.json", "file not found"),
    case(TRAIN, "config not JSON", {}, "config.json", "not a valid training config", "Expecting",
         files={"inputs/config.json": text("{not json")}),
    case(TRAIN, "config not a JSON object", {}, "config.json", "not a valid training config",
         "expected a mapping of settings", files={"inputs/config.json": text("[1, 2]")}),
    case(TRAIN, "YAML config not YAML", {"config": "config.yaml"}, "config.yaml", "not a valid training config",
         "while parsing", files={"config.yaml": text("steps: [1, 2")}, marks=YAML),
    case(TRAIN, "config unknown key", {}, "config.json", "unknown training config keys: stepz",
         files={"inputs/config.json": train_config(stepz=3)}),
    case(TRAIN, "config invalid value", {}, "config.json", "similarity must be one of",
         files={"inputs/config.json": train_config(similarity="mi")}),
    case(TRAIN, "config unknown data kind", {}, "config.json", "data kind must be one of",
         files={"inputs/config.json": train_config(data={"kind": "nowhere"})}),
    case(TRAIN, "config data source option unknown", {}, "config.json",
         "data: unknown option(s) bogus of the synthetic data source",
         files={"inputs/config.json": train_config(data={"kind": "synthetic", "bogus": 1})}),
    case(TRAIN, "config data source missing", {}, "absent.json", "not a readable Learn2Reg dataset.json",
         files={"inputs/config.json": train_config(data={"kind": "learn2reg", "dataset_json": "absent.json"})}),
    case(TRAIN, "config validation data source missing", {}, "nowhere", "no sub-*/**/*_T1w.nii[.gz] image found",
         files={"inputs/config.json": train_config(validation_data={"kind": "bids", "root": "nowhere"})}),
    case(TRAIN, "config device cuda without a GPU", {}, "config.json", "device: CUDA was asked for",
         files={"inputs/config.json": train_config(device="cuda")}, marks=NO_GPU),
    case(TRAIN, "--device not a device", {"--device": "nowhere"}, "--device: not a device: nowhere"),
    no_gpu_case(TRAIN),
    case(TRAIN, "--time-limit negative", {"--time-limit": "-1"}, "--time-limit: must be 0 or more, got -1.0"),
    case(TRAIN, "--stop-at 0", {"--stop-at": "0"}, "--stop-at: must be 1 or more, got 0"),
    case(TRAIN, "--stages negative", {"--stages": "-1"}, "--stages: must be 0 or more, got -1"),
    case(TRAIN, "--stages beyond the network's", {"--stages": "3"}, "--stages: must be 2 or less", "got 3"),
    case(TRAIN, "--stages without the earlier stage's model", {"--stages": "1"}, "stage0/model.safetensors",
         "--stages 1: needs stage 0's model"),
    *model_cases(TRAIN, "--init-model"),
    case(TRAIN, "--init-model of another network", {"--init-model": "model.safetensors"}, "model.safetensors",
         "--init-model: its network differs from the config's", files={"model.safetensors": model(ONE_STAGE)}),
    *folder_cases(TRAIN, "out_dir", "out_dir"),
]


@contextlib.contextmanager
def read_only_mount(path: Path) -> Iterator[None]:
    """An empty read-only file system mounted at ``path`` for the block."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _contents(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's sha256, or ``folder``."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
            else "folder" for path in folder.rglob("*")}


def assert_refused(command: Command, argv: Sequence[str], fragments: Sequence[str], folder: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    """``command`` refuses ``argv``: exit code 2, on stderr one line ``<prog>: error: ...`` holding every
    fragment and no traceback, nothing on stdout, and ``folder`` as it was (nothing new in it, every
    file's bytes unchanged)."""
    before = _contents(folder)
    capsys.readouterr()
    code = command.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not out, err
    assert err.startswith(f"{command.prog}: error: "), err
    missing = [fragment for fragment in fragments if fragment not in err]
    assert not missing, (missing, err)
    assert _contents(folder) == before


CASES = [*APP_CASES, *REGISTER_CASES, *TRAIN_CASES]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(bad: Case, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, and the App's default work folder (./work), lie in it
    bad.command.inputs(tmp_path / "inputs")
    for relative, make in bad.files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    with read_only_mount(tmp_path / bad.read_only) if bad.read_only else contextlib.nullcontext():
        assert_refused(bad.command, bad.argv(), bad.fragments, tmp_path, capsys)


def test_the_table_holds_at_least_35_kinds_across_the_three_commands() -> None:
    assert len(CASES) >= 35
    assert {bad.values[0].command.prog for bad in CASES} == {APP.prog, REGISTER.prog, TRAIN.prog}
