"""Singularity.def, checked without Singularity/Apptainer (neither can be installed here): parsed, its base
image and install step held against the project's torch pin and packaging, and its %environment and %test
smoke test run outside a container with this environment's rwcflow."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("labels", "help", "files", "post", "environment", "runscript", "test")
BASE_IMAGE = re.compile(r"pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn(?P<cudnn>\d+)-runtime")


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The header (``Key: value`` lines) and the sections (``%name`` to the next one, dedented) of a
    Singularity definition file."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        start = re.fullmatch(r"%(\w+)\s*", line)
        if start:
            current = start.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    return header, {name: textwrap.dedent("\n".join(lines)).strip() for name, lines in sections.items()}


def commands(script: str) -> list[str]:
    """The shell commands of a section: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


DEFINITION = parse_definition((ROOT / "Singularity.def").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH_PIN = next(line for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
                 if line and not line.startswith("#"))


def test_base_image_is_the_cuda_build_of_the_pinned_torch():
    header, sections = DEFINITION
    assert header["Bootstrap"] == "docker"
    base = BASE_IMAGE.fullmatch(header["From"])
    assert base, header["From"]
    assert TORCH_PIN == f"torch=={base['torch']}"  # the pin make and CI install
    assert set(SECTIONS) <= set(sections)
    labels = dict(line.split(None, 1) for line in sections["labels"].splitlines())
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.base.name"] == f"docker.io/{header['From']}"
    for usage in ("singularity run --nv -B", "CUDA_VISIBLE_DEVICES", "XDG_CACHE_HOME"):
        assert usage in sections["help"]


def test_runscript_runs_the_bids_app_entry_point():
    assert commands(DEFINITION[1]["runscript"]) == ['exec rwcflow "$@"']
    assert PYPROJECT["project"]["scripts"]["rwcflow"] == "rwcflow.bids_app.cli:main"


def test_files_copy_exactly_what_the_build_of_the_project_needs():
    copied = dict(line.split() for line in commands(DEFINITION[1]["files"]))
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    top_level = {folder.split("/")[0] for folder in folders}
    assert set(copied) == {"pyproject.toml", PYPROJECT["project"]["readme"], "requirements", *top_level}
    assert all((ROOT / source).exists() and copied[source] == f"/opt/rwcflow/{source}" for source in copied)


def test_post_installs_the_container_lock_then_the_project_and_keeps_the_pinned_torch():
    post = commands(DEFINITION[1]["post"])
    installs = [shlex.split(line) for line in post if "pip install" in line]
    assert [words[:5] for words in installs] == [["/opt/conda/bin/python", "-m", "pip", "install", "--no-cache-dir"]] * 2
    # first every dependency at its locked version, torch's pin as a constraint (pip fails rather than replace
    # the base image's torch), ...
    assert installs[0][5:] == ["--requirement", "/opt/rwcflow/requirements/container.txt",
                               "--constraint", "/opt/rwcflow/requirements/torch.txt"]
    # ... then the copied project, resolving nothing more
    assert installs[1][5:] == ["--no-deps", "/opt/rwcflow"]
    # and the build stops unless the torch left behind is the pinned CUDA build
    assert any(line.startswith("/opt/conda/bin/python -c") and f"== '{TORCH_PIN.split('==')[1]}'" in line
               and "torch.version.cuda" in line for line in post)


def test_every_torch_requirement_admits_the_pin():
    """What pip resolves with the constraint: the project's torch requirement, and those of its installed
    dependencies, all accept the pinned version, so the base image's torch satisfies them."""
    pinned = TORCH_PIN.split("==")[1]
    requirements = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    torch_requirements = [requirement for requirement in requirements if requirement.name == "torch"]
    for requirement in requirements:
        for line in metadata.requires(requirement.name) or []:
            needed = Requirement(line)
            if needed.name == "torch" and (needed.marker is None or needed.marker.evaluate({"extra": ""})):
                torch_requirements.append(needed)
    assert len(torch_requirements) >= 2  # rwcflow's own and monai's
    assert all(requirement.specifier.contains(pinned) for requirement in torch_requirements), torch_requirements


def test_environment_and_smoke_test_run_outside_a_container(tmp_path):
    """%environment then %test, as the container runs them, with this environment's rwcflow on the PATH."""
    _, sections = DEFINITION
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MPLCONFIGDIR", None)
    script = f"{sections['environment']}\n{sections['test']}\n"
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.rstrip().endswith("rwcflow smoke test passed")
    assert "rwcflow 0.1.0" in result.stdout
    # the caches went where the environment sent them, and the scratch folder was removed
    assert (tmp_path / "cache" / "matplotlib").is_dir()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith("tmp")]
