"""The locks (requirements/lock.txt for make and CI, requirements/container.txt for Singularity.def): every
package pinned exactly, torch left to its own pin, every range of pyproject.toml met by the lock (so a
changed range without `make lock` fails here), and this environment installed from the lock."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = {"lock.txt": "test", "container.txt": "validator"}  # each lock and the extra it holds


def pins(path: Path) -> dict[str, Version]:
    """A pip-compile output's ``name==version`` lines (comments and annotations skipped)."""
    locked = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==" and not requirement.extras and requirement.marker is None, line
            locked[canonicalize_name(requirement.name)] = Version(specifier.version)
    return locked


def torch_pin() -> Requirement:
    lines = [line for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(lines) == 1
    return Requirement(lines[0])


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_every_requirement_of_pyproject_within_its_range(lock):
    locked = pins(ROOT / "requirements" / lock)
    assert "torch" not in locked  # installed first from its own pin, CPU or CUDA build
    wanted = [Requirement(line) for line in
              PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"][LOCKS[lock]]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert requirement.specifier.contains(next(iter(torch_pin().specifier)).version)
        else:
            assert name in locked, f"{requirement} is not in {lock}: run make lock"
            assert requirement.specifier.contains(locked[name], prereleases=True), (requirement, locked[name])


def test_this_environment_is_the_lock():
    """What make installed: every locked package at its locked version, and torch at its pin."""
    different = {name: (str(version), metadata.version(name)) for name, version in
                 pins(ROOT / "requirements" / "lock.txt").items() if Version(metadata.version(name)) != version}
    assert not different, different
    assert Version(metadata.version("torch")).base_version == next(iter(torch_pin().specifier)).version
