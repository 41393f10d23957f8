"""The registration methods of the benchmark: rwcflow's configurations, the peers, and baselines.

A method is named by a spec ``NAME`` or ``NAME:key=value,key=value`` (``rwcflow-io:iterations=40,
grid_factor=3``, ``rwcnet:model=PATH``, ``ants-syn:type_of_transform=SyNCC``, ``niftyreg:be=0.005``).
Every method maps the case's fixed grid to its moving image; its result is the whole fixed→moving
mapping as RAS-mm displacements on the fixed grid, so the metrics are computed the same way for all.

=================  ===========================================================================
``identity``       world identity (no registration)
``affine``         rwcflow's affine pre-alignment alone
``rwcflow-io``     affine + instance optimisation alone (``model=None``); keys: the fields of
                   :class:`rwcflow.optimize.InstanceOptimization`, ``affine=false``
``rwcflow-io-fast``  the same with ``grid_factor=3, iterations=40`` (the lean CPU preset)
``rwcnet``         affine + RWCNet (``--model PATH`` or ``model=PATH``), no instance optimisation
``rwcnet-io``      affine + RWCNet + instance optimisation
``ants-syn``       antspyx ``registration(type_of_transform="SyN")`` (affine + SyN, Mattes MI), in
                   antspyx's own environment; keys: keyword arguments of ``ants.registration``
``convexadam``     ``convex_adam_MIND.convex_adam_pt`` with its defaults (no affine step); keys:
                   its keyword arguments
``niftyreg``       ``reg_aladin`` (affine) then ``reg_f3d`` with its defaults; keys: ``reg_f3d``
                   options (``be=0.005`` → ``-be 0.005``)
=================  ===========================================================================
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import peers
from benchmarks.cases import Case

if TYPE_CHECKING:  # rwcflow (and torch) are imported only by the methods that use them
    from rwcflow.io import Grid

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """Settings every method of a run shares."""

    threads: int = 1
    device: str = "cpu"
    model: str | None = None  # RWCNet model file of the rwcnet methods
    cache: str | None = None  # benchmark cache (where NiftyReg was extracted)
    ants_python: str | None = None  # interpreter with antspyx

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


@dataclass
class Result:
    """A finished registration: its time, a breakdown, and the fixed grid with the mapping's displacements.

    ``displacement()`` gives ``(X, Y, Z, 3)`` RAS mm and the fixed grid; it is called after the
    peak memory was read, so converting the output does not count as the method's memory.
    """

    seconds: float
    details: dict
    displacement: Callable[[], tuple[np.ndarray, Grid]]


class Method:
    """A registration method; ``missing`` says why it cannot run here, ``run`` registers a case."""

    def __init__(self, spec: str):
        self.spec = spec

    def missing(self, context: Context) -> str | None:
        return None

    def run(self, case: Case, work: Path, context: Context) -> Result:
        raise NotImplementedError


def parse_value(text: str) -> bool | int | float | str:
    """A spec value: ``true``/``false``, an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Rwcflow(Method):
    """rwcflow's :func:`~rwcflow.register.register`: affine, optionally RWCNet, optionally instance optimisation."""

    def __init__(self, spec: str, *, network: bool, io: bool, affine: bool = True, model: str | None = None, **options):
        from rwcflow.optimize import InstanceOptimization

        super().__init__(spec)
        known = {f.name for f in fields(InstanceOptimization)}
        if unknown := set(options) - known:
            raise ValueError(f"{spec}: unknown option(s) {sorted(unknown)}; expected affine, model or {sorted(known)}")
        if options and not io:
            raise ValueError(f"{spec}: instance optimisation options given to a method without it")
        self.network, self.affine, self.model = network, affine, model
        self.options = InstanceOptimization(**options) if io else None

    def _model(self, context: Context) -> str | None:
        return self.model or context.model

    def missing(self, context: Context) -> str | None:
        if self.network:
            model = self._model(context)
            if model is None:
                return "no trained RWCNet model (give --model PATH)"
            if not Path(model).is_file():
                return f"RWCNet model {model} not found"
        return None

    def run(self, case: Case, work: Path, context: Context) -> Result:
        import torch

        from rwcflow.checkpoint import load_model
        from rwcflow.io import load_image
        from rwcflow.register import register

        torch.set_num_threads(context.threads)
        fixed, moving = load_image(case.fixed), load_image(case.moving)
        network = load_model(self._model(context), device=context.device) if self.network else None
        start = time.perf_counter()
        result = register(fixed, moving, model=network, affine=self.affine,
                          instance_optimization=self.options or False, device=context.device)
        if context.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return Result(seconds, dict(result.timings), lambda: (result.world_displacement(), fixed.grid))


class ConvexAdam(Method):
    """ConvexAdam (Siebert et al. 2021) through the ``convexadam`` package, on the fixed grid."""

    def __init__(self, spec: str, **options):
        super().__init__(spec)
        self.options = options

    def missing(self, context: Context) -> str | None:
        return peers.convexadam_missing()

    def run(self, case: Case, work: Path, context: Context) -> Result:
        import torch
        from convexAdam.convex_adam_MIND import convex_adam_pt

        from rwcflow import transforms
        from rwcflow.io import load_image, resample

        torch.set_num_threads(context.threads)
        fixed, moving = load_image(case.fixed), load_image(case.moving)
        if moving.grid != fixed.grid:
            moving = resample(moving, fixed.grid)
        start = time.perf_counter()
        voxels = convex_adam_pt(fixed.data, moving.data, device=torch.device(context.device), **self.options)
        seconds = time.perf_counter() - start
        # (X, Y, Z, 3) displacements in voxels of the fixed grid, channel d along array axis d
        field = torch.from_numpy(np.moveaxis(voxels, -1, 0)[None].copy())
        return Result(seconds, {}, lambda: (transforms.compose_world_displacement(fixed.grid, np.eye(4), field), fixed.grid))


class AntsSyn(Method):
    """ANTs SyN via antspyx in its own environment (:mod:`benchmarks.ants_syn`)."""

    def __init__(self, spec: str, **options):
        super().__init__(spec)
        self.options = options

    def missing(self, context: Context) -> str | None:
        return peers.ants_missing(peers.ants_python(context.ants_python))

    def run(self, case: Case, work: Path, context: Context) -> Result:
        from rwcflow.transforms import read_displacement_field

        command = [peers.ants_python(context.ants_python), str(REPOSITORY / "benchmarks" / "ants_syn.py"),
                   str(case.fixed), str(case.moving), str(work), "--options", json.dumps(self.options)]
        env = {**os.environ, "ANTS_RANDOM_SEED": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"antspyx failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return Result(report["seconds"], {}, lambda: read_displacement_field(work / "ants_xfm.nii.gz"))


class NiftyReg(Method):
    """NiftyReg: ``reg_aladin`` (affine) then ``reg_f3d`` (cubic B-spline FFD), default settings."""

    def __init__(self, spec: str, **options):
        super().__init__(spec)
        self.options = [item for key, value in options.items() for item in (f"-{key}", str(value))]

    def missing(self, context: Context) -> str | None:
        if peers.niftyreg_folder(context.cache) is None:
            return "NiftyReg binaries not found (python -m benchmarks.peers --fetch-niftyreg)"
        return None

    def run(self, case: Case, work: Path, context: Context) -> Result:
        folder = peers.niftyreg_folder(context.cache)
        ref, flo, threads = str(case.fixed), str(case.moving), str(context.threads)
        aff, cpp = str(work / "aladin_affine.txt"), str(work / "f3d_cpp.nii.gz")
        steps = [
            [folder / "reg_aladin", "-ref", ref, "-flo", flo, "-aff", aff, "-res", str(work / "aladin.nii.gz"), "-omp", threads],
            [folder / "reg_f3d", "-ref", ref, "-flo", flo, "-aff", aff, "-cpp", cpp, "-res", str(work / "f3d.nii.gz"),
             "-omp", threads, *self.options],
        ]
        start = time.perf_counter()
        for step in steps:
            _run_program(step)
        seconds = time.perf_counter() - start
        return Result(seconds, {}, lambda: _niftyreg_displacement(folder, ref, cpp, work))


def _run_program(command: list) -> None:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"{Path(command[0]).name} failed: {lines[-1]}")


def _niftyreg_displacement(folder: Path, ref: str, cpp: str, work: Path) -> tuple[np.ndarray, Grid]:
    """NiftyReg's control points as RAS-mm displacements on the reference grid.

    ``reg_transform -def`` writes, for each reference voxel, the floating-image position it maps to in
    the NIfTI world frame (RAS mm); the displacement is that position minus the voxel's own.
    """
    import nibabel as nib

    from rwcflow.io import load_image

    deformation = work / "f3d_def.nii.gz"
    _run_program([folder / "reg_transform", "-ref", ref, "-def", cpp, deformation])
    grid = load_image(ref).grid
    positions = np.asarray(nib.load(str(deformation)).dataobj, dtype=np.float64).reshape(*grid.shape, 3)
    return positions - grid.world_points(), grid


METHODS: dict[str, Callable[..., Method]] = {
    "identity": partial(Rwcflow, network=False, io=False, affine=False),
    "affine": partial(Rwcflow, network=False, io=False),
    "rwcflow-io": partial(Rwcflow, network=False, io=True),
    "rwcflow-io-fast": partial(Rwcflow, network=False, io=True, grid_factor=3, iterations=40),
    "rwcnet": partial(Rwcflow, network=True, io=False),
    "rwcnet-io": partial(Rwcflow, network=True, io=True),
    "ants-syn": AntsSyn,
    "convexadam": ConvexAdam,
    "niftyreg": NiftyReg,
}


def make_method(spec: str) -> Method:
    """The method of a spec ``NAME[:key=value,...]`` (see the module docstring)."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{spec}: option {item!r} is not key=value")
        options[key.strip()] = parse_value(value.strip())
    factory = METHODS[name]
    if isinstance(factory, partial):
        options = {**factory.keywords, **options}
        factory = factory.func
    return factory(spec, **options)

