"""Stage-wise training of RWCNet (Sivan et al. 2022), command ``rwcflow-train``.

Stages are trained one after the other (1/4, then 1/2, then full resolution for the paper's network).
While stage ``k`` trains, stages ``0..k-1`` are frozen (no gradients, eval mode) and run on the fly on
the whole image at every step, exactly as at inference (:meth:`rwcflow.models.RWCNet.run_stage`): their
field is resized to stage ``k``'s grid, the moving image is warped by it and their final hidden state is
resampled onto the patch. Nothing is cached on disk. Stage ``k`` itself runs on one random patch of its
grid of the size of its inference patches (the whole grid when it has one patch).

Losses, summed over the stage's GRU iterations with weights ``sequence_gamma ** (N - 1 - i)``
(normalised to add up to one): image similarity (MSE or local NCC) between the fixed image and the
moving image warped through the stage's field, soft Dice between the fixed labels and the moving
one-hot labels warped *linearly* (so that the gradient reaches the field), keypoint distance in mm,
the diffusion regulariser and, for pairs whose true field is known (synthetic), the endpoint error in
mm. Adam, gradient clipping, mixed precision on CUDA, data-parallel over ``torchrun`` processes.

A run folder holds ``config.json``; per stage ``stage<k>/checkpoint.pt`` (resumable: weights, optimiser,
step, random state), ``stage<k>/log.csv`` (training losses, validation Dice / TRE / endpoint error) and
``stage<k>/model.safetensors``; and the final ``model.safetensors``. Model files carry the training
config, the steps and the validation numbers in their provenance.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rwcflow import metrics, spatial
from rwcflow.checkpoint import default_model_path, load_model, read_metadata, save_model
from rwcflow.checks import check_at_least, check_device, check_model, check_output_folder
from rwcflow.console import command_logging
from rwcflow.datasets import Pair, PairSource, StepPairs, SyntheticSource, first, make_source, source_class
from rwcflow.errors import InputError, RwcflowError
from rwcflow.io import atomic_write
from rwcflow.losses import diffusion_loss, keypoint_loss, mse_loss, ncc_loss, soft_dice_loss
from rwcflow.models import RWCNet, RWCNetConfig, StageConfig, axis_patches, resize, resize_region, stage_shape

Tensor = torch.Tensor
log = logging.getLogger(__name__)

SIMILARITIES = ("mse", "ncc")
SCHEDULES = ("constant", "cosine")
#: ``rwcflow-train``'s exit status when it stopped at its ``--time-limit`` (EX_TEMPFAIL): run it again
EXIT_RESUME = 75


@dataclass
class LossWeights:
    """Weights of the loss terms; a term without data (no labels, keypoints or true field) is left out.

    ``similarity`` (MSE ×10 as the reference; use about 1 for NCC), ``dice`` (soft Dice on labels),
    ``keypoints`` (mean keypoint distance, mm), ``diffusion`` (regulariser, in stage voxels), ``flow``
    (mean endpoint error to the true field, mm; 0 is the paper's unsupervised recipe).
    """

    similarity: float = 10.0
    dice: float = 1.0
    keypoints: float = 0.1
    diffusion: float = 0.1
    flow: float = 0.0


@dataclass
class TrainConfig:
    """One training run; saved as ``config.json`` in the run folder and inside every model file.

    ``model``: the network; ``data``: the training pairs (:func:`rwcflow.datasets.make_source`; default
    synthetic pairs at 2 mm with displacements up to 16 voxels, so that the quarter-resolution first stage
    sees whole voxels of motion) and
    ``validation_data`` the validation pairs' source (default: ``data``'s own validation pairs);
    ``steps``: training steps per stage; ``learning_rate`` with a ``"constant"`` or ``"cosine"``
    schedule; ``similarity``: ``"mse"`` or ``"ncc"`` (window ``ncc_window`` voxels);
    ``train_patch_fraction``: per stage, the training patch's share of each axis of the stage grid
    (default: the size of the stage's inference patches); ``batch_size``: pairs per step (the paper: 1;
    more need pairs on grids of one shape, e.g. synthetic ones); ``dice_labels``: at
    most this many labels (a random choice per step) enter the Dice term; ``amp``: mixed precision
    (float16) on CUDA; ``validate_every``, ``checkpoint_every``: in steps (0: only at the end);
    ``num_workers``: DataLoader processes preparing pairs; ``synthesize_on_device``: make synthetic pairs
    on ``device`` in the training process instead (no DataLoader processes; on a GPU many times faster);
    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``.
    """

    model: RWCNetConfig = field(default_factory=RWCNetConfig)
    data: dict = field(default_factory=lambda: {"kind": "synthetic", "options": {"max_displacement": 16.0}})
    validation_data: dict | None = None
    steps: tuple[int, ...] = (2000, 2000, 1000)
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    similarity: str = "mse"
    ncc_window: int = 9
    weights: LossWeights = field(default_factory=LossWeights)
    sequence_gamma: float = 0.8
    train_patch_fraction: tuple[float, ...] | None = None
    batch_size: int = 1
    dice_labels: int = 32
    grad_clip: float = 1.0
    amp: bool = True
    validate_every: int = 500
    checkpoint_every: int = 100
    seed: int = 0
    num_workers: int = 0
    synthesize_on_device: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = RWCNetConfig.from_dict(self.model)
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        self.steps = tuple(int(s) for s in self.steps)
        if len(self.steps) != len(self.model.stages) or min(self.steps) < 1:
            raise ValueError(f"steps needs one positive count per stage ({len(self.model.stages)}), got {self.steps}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        for name, spec in (("data", self.data), ("validation_data", self.validation_data)):
            if spec is not None:
                try:
                    source_class(spec if isinstance(spec, dict) else {"kind": spec})
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if self.train_patch_fraction is not None:
            self.train_patch_fraction = tuple(float(f) for f in self.train_patch_fraction)
            if len(self.train_patch_fraction) != len(self.model.stages) or not all(0 < f <= 1 for f in self.train_patch_fraction):
                raise ValueError(f"train_patch_fraction needs one value in (0, 1] per stage, got {self.train_patch_fraction}")
        if self.learning_rate <= 0 or not 0 <= self.sequence_gamma <= 1 or min(self.dice_labels, self.batch_size) < 1:
            raise ValueError("learning_rate must be > 0, sequence_gamma in [0, 1], dice_labels and batch_size >= 1")

    def to_dict(self) -> dict:
        """Plain JSON types only."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(model=self.model.to_dict(), weights=asdict(self.weights), steps=list(self.steps))
        if self.train_patch_fraction is not None:
            data["train_patch_fraction"] = list(self.train_patch_fraction)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**data)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file (or YAML, when PyYAML is installed); a missing file or
    one that is not a valid config is an :class:`~rwcflow.errors.InputError` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    parse, errors = json.loads, ()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional: only for YAML configs

        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    try:
        data = parse(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of settings, got {type(data).__name__}")
        return TrainConfig.from_dict(data)
    except (ValueError, TypeError, *errors) as exc:  # YAML's messages span lines: one line here
        raise InputError(path, f"not a valid training config ({' '.join(str(exc).split())})") from None


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``config`` as JSON, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config.to_dict(), indent=2) + "\n"))


# --- one stage's forward pass on a patch -----------------------------------------------------------


@dataclass
class StageBatch:
    """A pair prepared for stage ``k``: whole stage-grid tensors, the patch ``index`` the stage runs on,
    and the stage grid's voxel size in mm. Labels are soft one-hot maps, keypoints stage voxels."""

    fixed: Tensor
    moving: Tensor
    field: Tensor
    warped: Tensor
    hidden: Tensor | None
    index: tuple
    spacing: Tensor
    fixed_onehot: Tensor | None = None
    moving_onehot: Tensor | None = None
    mask: Tensor | None = None
    fixed_keypoints: Tensor | None = None
    moving_keypoints: Tensor | None = None
    true_field: Tensor | None = None

    @property
    def origin(self) -> Tensor:
        """The patch's first voxel, ``(1, 3, 1, 1, 1)``."""
        starts = [s.start for s in self.index[-3:]]
        return torch.tensor(starts, dtype=self.field.dtype, device=self.field.device).view(1, 3, 1, 1, 1)

    @property
    def grid(self) -> Tensor:
        """Stage-grid coordinates of the patch's voxels, ``(1, 3, x, y, z)``."""
        shape = self.fixed[self.index].shape[2:]
        return spatial.identity_grid(shape, device=self.field.device, dtype=self.field.dtype) + self.origin


def patch_shape(shape: Sequence[int], stage: StageConfig, overlap: float, fraction: float | None = None) -> tuple[int, ...]:
    """The training patch of a stage grid of ``shape``: ``fraction`` of each axis, or by default the size of
    the stage's inference patches (:func:`rwcflow.models.axis_patches`; the whole grid for one patch)."""
    if fraction is not None:
        return tuple(max(2, min(n, round(n * fraction))) for n in shape)
    return tuple(axis_patches(n, stage.patches, overlap)[0][1] for n in shape)


def sample_patch(shape: Sequence[int], size: Sequence[int], generator: torch.Generator) -> tuple:
    """A random patch of ``size`` inside a grid of ``shape``, as an index ``(..., slice, slice, slice)``."""
    starts = [int(torch.randint(0, n - m + 1, (), generator=generator)) for n, m in zip(shape, size)]
    return (..., *(slice(a, a + m) for a, m in zip(starts, size)))


def prepare_stage(model: RWCNet, k: int, pair: Pair, index: tuple | None = None, *,
                  generator: torch.Generator | None = None, fraction: float | None = None,
                  dice_labels: int = 32) -> StageBatch:
    """Run the (frozen) stages before ``k`` on the whole pair and set up stage ``k``'s inputs as
    :meth:`~rwcflow.models.RWCNet.run_stage` does; ``index`` (default: a random patch of
    :func:`patch_shape`) is where it runs."""
    config = model.config.stages[k]
    shape = stage_shape(pair.fixed.shape[2:], config.scale)
    fixed, moving = resize(pair.fixed, shape), resize(pair.moving, shape)
    previous_field = hidden = None
    if k > 0:
        with torch.no_grad():
            previous = model(pair.fixed, pair.moving, stages=range(k)).stages[-1]
        previous_field, hidden = previous.field, previous.hidden
    if previous_field is None:
        init, warped = fixed.new_zeros((fixed.shape[0], 3, *shape)), moving
    else:
        init = spatial.resize_field(previous_field, shape)
        warped = spatial.warp(moving, init)
    generator = generator or torch.Generator().manual_seed(0)
    if index is None:
        index = sample_patch(shape, patch_shape(shape, config, model.config.patch_overlap, fraction), generator)
    ratio = [(m - 1) / max(n - 1, 1) for m, n in zip(shape, pair.fixed.shape[2:])]
    spacing = torch.tensor([s / r for s, r in zip(pair.spacing, ratio)], device=fixed.device)
    batch = StageBatch(fixed, moving, init, warped, hidden, index, spacing)
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        values = np.intersect1d(pair.fixed_labels.unique().cpu(), pair.moving_labels.unique().cpu())
        values = values[values > 0]
        if len(values) > dice_labels:
            values = values[torch.randperm(len(values), generator=generator)[:dice_labels].numpy()]
        if len(values):
            batch.fixed_onehot = resize(spatial.one_hot(pair.fixed_labels, values.tolist()), shape)
            batch.moving_onehot = resize(spatial.one_hot(pair.moving_labels, values.tolist()), shape)
    if pair.fixed_mask is not None:
        batch.mask = resize(pair.fixed_mask, shape)
    if pair.fixed_keypoints is not None and pair.moving_keypoints is not None:
        scale = torch.tensor(ratio, device=fixed.device)
        batch.fixed_keypoints, batch.moving_keypoints = pair.fixed_keypoints * scale, pair.moving_keypoints * scale
    if pair.true_field is not None:
        batch.true_field = spatial.resize_field(pair.true_field, shape)
    return batch


def stage_fields(model: RWCNet, k: int, batch: StageBatch, module: torch.nn.Module | None = None) -> list[Tensor]:
    """Stage ``k``'s total field on the patch after each GRU iteration, in stage voxels.

    ``module`` runs the stage (default ``model.stages[k]``; a DistributedDataParallel wrapper of it
    when training on several processes). Each residual is composed with the stage's starting field
    sampled on the whole stage grid, which equals :func:`rwcflow.spatial.compose` on the whole grid.
    """
    stage = model.stages[k]
    index = batch.index
    previous = None if batch.hidden is None else resize_region(batch.hidden, batch.fixed.shape[2:], index)
    flows, _ = (module or stage)(batch.fixed[index], batch.warped[index], batch.field[index], previous)
    grid = batch.grid
    fields = []
    for flow in flows:
        residual = stage.displacement(flow).float()
        fields.append(residual + spatial.sample(batch.field, grid + residual))
    return fields


def field_terms(field: Tensor, batch: StageBatch, config: TrainConfig) -> dict[str, Tensor]:
    """The unweighted loss terms of one total ``field`` on the patch (those with data only)."""
    index = batch.index
    coords = batch.grid + field
    fixed = batch.fixed[index]
    mask = None if batch.mask is None else batch.mask[index]
    warped = spatial.sample(batch.moving, coords)
    if config.similarity == "ncc":
        similarity = ncc_loss(fixed, warped, window=config.ncc_window, mask=mask)
    else:
        similarity = mse_loss(fixed, warped, mask=mask)
    terms = {"similarity": similarity, "diffusion": diffusion_loss(field)}
    if batch.fixed_onehot is not None:
        warped_onehot = spatial.sample(batch.moving_onehot, coords, padding_mode="zeros")
        terms["dice"] = soft_dice_loss(batch.fixed_onehot[index], warped_onehot)
    if batch.fixed_keypoints is not None:
        origin = batch.origin.view(1, 3)
        size = torch.tensor(field.shape[2:], device=field.device, dtype=field.dtype)
        local_fixed, local_moving = batch.fixed_keypoints - origin, batch.moving_keypoints - origin
        inside = ((local_fixed >= 0) & (local_fixed <= size - 1)).all(dim=1)
        if inside.any():
            terms["keypoints"] = keypoint_loss(local_fixed[inside], local_moving[inside], field, batch.spacing)
    if batch.true_field is not None:
        error = (field - batch.true_field[index]) * batch.spacing.view(1, 3, 1, 1, 1)
        terms["flow"] = torch.linalg.vector_norm(error, dim=1).mean()
    return terms


def stage_loss(fields: Sequence[Tensor], batch: StageBatch, config: TrainConfig) -> tuple[Tensor, dict[str, float]]:
    """The weighted loss over the GRU iterations' fields, and the final field's unweighted terms."""
    decay = [config.sequence_gamma ** (len(fields) - 1 - i) for i in range(len(fields))]
    weights = asdict(config.weights)
    total = 0.0
    for share, iterate in zip(decay, fields):
        terms = field_terms(iterate, batch, config)
        total = total + share / sum(decay) * sum(weights[name] * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


# --- validation ------------------------------------------------------------------------------------


def evaluate(pairs: Sequence[Pair], fields: Sequence[Tensor]) -> dict[str, float]:
    """Mean validation numbers of ``fields`` (input-grid voxels) over ``pairs``: ``mse``, and where the
    pairs have them ``dice`` (labels), ``tre_mm`` (keypoints), ``epe_mm`` (true field, in the mask)."""
    scores: dict[str, list[float]] = {}
    for pair, u in zip(pairs, fields):
        scores.setdefault("mse", []).append(float(mse_loss(pair.fixed, spatial.warp(pair.moving, u))))
        if pair.fixed_labels is not None and pair.moving_labels is not None:
            warped = spatial.warp_labels(pair.moving_labels, u)
            scores.setdefault("dice", []).append(
                metrics.mean_score(metrics.dice(pair.fixed_labels, warped, moving_labels=pair.moving_labels)))
        if pair.fixed_keypoints is not None and pair.moving_keypoints is not None:
            scores.setdefault("tre_mm", []).append(
                float(keypoint_loss(pair.fixed_keypoints, pair.moving_keypoints, u, pair.spacing)))
        if pair.true_field is not None:
            spacing = torch.tensor(pair.spacing, device=u.device).view(1, 3, 1, 1, 1)
            mask = None if pair.fixed_mask is None else pair.fixed_mask > 0
            scores.setdefault("epe_mm", []).append(
                metrics.endpoint_error(u * spacing, pair.true_field * spacing, mask)[0])
    return {name: float(np.mean(values)) for name, values in scores.items()}


def validate(model: RWCNet, pairs: Sequence[Pair], stages: Iterable[int]) -> dict[str, float]:
    """:func:`evaluate` of the network's fields (``stages`` run, eval mode, no gradients)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        fields = [model(pair.fixed, pair.moving, stages=stages, return_hidden=False).field for pair in pairs]
    model.train(training)
    return evaluate(pairs, fields)


# --- the training loop ----------------------------------------------------------------------------


@dataclass
class StageResult:
    """What :func:`train_stage` leaves: the model file, the log and the final validation numbers."""

    model: Path
    log: Path
    validation: dict[str, float]
    network: RWCNet


def _distributed() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the variables ``torchrun`` sets (``(0, 1, 0)`` without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _past(deadline: float | None, world: int, device: torch.device) -> bool:
    """Whether ``deadline`` (a :func:`time.monotonic` value) has passed, as every process agrees."""
    if deadline is None:
        return False
    late = torch.tensor(float(time.monotonic() >= deadline), device=device)
    if world > 1:
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late)


def _initial_model(config: TrainConfig, k: int, init_model: str | os.PathLike | RWCNet | None) -> RWCNet:
    """A fresh network (stage 0, no ``init_model``) or ``init_model`` with the run's network config."""
    if init_model is None:
        if k > 0:
            raise ValueError(f"stage {k} needs the model trained up to stage {k - 1} (init_model)")
        torch.manual_seed(config.seed)
        return RWCNet(config.model)
    model = copy.deepcopy(init_model) if isinstance(init_model, RWCNet) else load_model(init_model)
    if not _same_network(model.config, config.model):
        raise ValueError(f"init_model's network config differs from the training config's: {init_model}")
    model.config = config.model  # the voxel size of this run's data
    return model


def _same_network(first: RWCNetConfig, second: RWCNetConfig) -> bool:
    """Whether two network configs differ at most in the voxel size the network runs at."""
    return replace(first, input_spacing_mm=None) == replace(second, input_spacing_mm=None)


def _schedule(config: TrainConfig, steps: int):
    if config.lr_schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return lambda step: 1.0


class _Log:
    """The stage's CSV log: one row per training step and per validation."""

    COLUMNS = ("step", "split", "loss", "similarity", "dice", "keypoints", "diffusion", "flow", "mse",
               "tre_mm", "epe_mm", "lr", "seconds")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.is_file() and resume_step > 0:  # keep what the checkpoint covers
            with path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.COLUMNS).writerow(
                {key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


class _Progress:
    """A one-line progress bar on a terminal, else a log line every tenth of the stage."""

    def __init__(self, stage: int, total: int, enabled: bool):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first: int | None = None

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self.first = step if self.first is None else self.first
        rate = (step - self.first + 1) / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * int(30 * step / self.total)
        line = f"stage {self.stage} [{bar:<30}] {step}/{self.total} loss {loss:.4f} {rate:.2f} step/s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if step == self.total else ""))
            sys.stderr.flush()
        elif step == self.total or step % max(1, self.total // 10) == 0:
            log.info(line)


def train_stage(
    config: TrainConfig,
    k: int,
    out_dir: str | os.PathLike,
    *,
    init_model: str | os.PathLike | RWCNet | None = None,
    source: PairSource | None = None,
    validation: Sequence[Pair] | None = None,
    stop_at: int | None = None,
    deadline: float | None = None,
    progress: bool = True,
) -> StageResult | None:
    """Train stage ``k`` of ``config``'s network into ``out_dir/stage<k>/``, resuming from its checkpoint.

    ``init_model`` (a model file or network; required for ``k > 0``) holds the earlier stages, which
    stay frozen. ``source`` (default: ``make_source(config.data)``) gives the training pairs and
    ``validation`` the validation pairs (default: from ``config.validation_data`` or the source).
    ``stop_at`` ends the run after that step, checkpointed (a job run in pieces), and ``deadline`` (a
    :func:`time.monotonic` value) after the first step that ends past it; the result is then ``None``. Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains on its own pairs and the
    gradients are averaged (NCCL on CUDA, gloo on CPU); process 0 writes the files.
    """
    rank, world, local_rank = _distributed()
    device = _device(config.device, local_rank)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    folder = Path(out_dir) / f"stage{k}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path = folder / "checkpoint.pt", folder / "model.safetensors"
    if model_path.is_file():  # finished earlier
        if own_group:
            dist.destroy_process_group()
        validation_scores = read_metadata(model_path)["provenance"].get("validation", {})
        return StageResult(model_path, folder / "log.csv", validation_scores, load_model(model_path, device=device))
    steps = config.steps[k]
    stop = steps if stop_at is None else min(stop_at, steps)

    source = source or make_source(config.data)
    workers = config.num_workers
    if config.synthesize_on_device and isinstance(source, SyntheticSource):
        source, workers = source.to(device), 0
    if config.model.input_spacing_mm is None:  # the network is to be run at the voxel size it learns at
        spacing = source.sample(torch.Generator().manual_seed(config.seed)).spacing
        config = replace(config, model=replace(config.model, input_spacing_mm=round(float(np.mean(spacing)), 3)))
    model = _initial_model(config, k, init_model).to(device)
    model.freeze_stages(range(k))
    stage = model.stages[k]
    optimizer = torch.optim.Adam(stage.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps))
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start = 0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        start = int(state["step"])
    model.train()
    module = DistributedDataParallel(stage, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else stage

    if rank == 0 and validation is None:
        validation = make_source(config.validation_data).validation() if config.validation_data else source.validation()
    validation = [pair.to(device) for pair in validation or []] if rank == 0 else []
    logbook = _Log(folder / "log.csv", start) if rank == 0 else None
    bar = _Progress(k, steps, progress and rank == 0)
    seed = config.seed * 7919 + 101 * rank + 13 * k
    # its own generator: the loader must not draw from the global one (dropout's), or a resumed run would differ
    loader = torch.utils.data.DataLoader(StepPairs(source, seed, range(start + 1, stop + 1), config.batch_size),
                                         batch_size=1,
                                         collate_fn=first, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    scores: dict[str, float] = {}
    clock = time.perf_counter()
    done = start

    def save_checkpoint(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "step": step, "stage": k}
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    for step, pair in zip(range(start + 1, stop + 1), loader):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 2**33)
        fraction = None if config.train_patch_fraction is None else config.train_patch_fraction[k]
        batch = prepare_stage(model, k, pair.to(device), generator=generator, fraction=fraction,
                              dice_labels=config.dice_labels)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            fields = stage_fields(model, k, batch, module)
        loss, terms = stage_loss(fields, batch, config)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(stage.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = step
        out_of_time = _past(deadline, world, device)
        if rank == 0:
            logbook.write(step=step, split="train", loss=float(loss.detach()), lr=scheduler.get_last_lr()[0],
                          seconds=time.perf_counter() - clock, **terms)
            bar.update(step, float(loss.detach()))
            if step == stop or out_of_time or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save_checkpoint(step)
            if validation and (step == steps or (config.validate_every and step % config.validate_every == 0)):
                scores = validate(model, validation, range(k + 1))
                logbook.write(step=step, split="val", seconds=time.perf_counter() - clock, **scores)
        if out_of_time:
            break

    if stop == start and rank == 0 and not checkpoint_path.is_file():
        save_checkpoint(start)
    finished = done == steps
    if finished and rank == 0:
        if not scores and validation:
            scores = validate(model, validation, range(k + 1))
        save_model(model, model_path, provenance={
            "training": config.to_dict(), "trained_stages": k + 1, "steps": list(config.steps[: k + 1]),
            "validation": scores, "world_size": world})
    if world > 1:
        dist.barrier()
    if own_group:
        dist.destroy_process_group()
    if not finished:
        return None
    return StageResult(model_path, folder / "log.csv", scores, model.eval())


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    stages: Iterable[int] | None = None,
    init_model: str | os.PathLike | None = None,
    source: PairSource | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> Path | None:
    """Train ``stages`` (default all) in order into ``out_dir``; returns ``out_dir/model.safetensors``.

    Each stage starts from the previous stage's model in ``out_dir`` (or ``init_model`` for the first
    one asked for); a finished stage is not trained again, an interrupted one resumes. After
    ``time_limit_s`` seconds the run stops at the end of a step, checkpointed, and returns ``None``
    (a job with a wall-time limit: run it again to go on).
    """
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _distributed()[0] == 0:
        save_config(config, out_dir / "config.json")
    order = list(range(len(config.model.stages)) if stages is None else stages)
    previous = init_model
    result = None
    for k in order:
        if previous is None and k > 0:
            previous = out_dir / f"stage{k - 1}" / "model.safetensors"
        result = train_stage(config, k, out_dir, init_model=previous, source=source, deadline=deadline,
                             progress=progress)
        if result is None:
            return None
        previous = result.model
    final = out_dir / "model.safetensors"
    if result is not None and order and order[-1] == len(config.model.stages) - 1 and _distributed()[0] == 0:
        atomic_write(final, lambda tmp: Path(tmp).write_bytes(result.model.read_bytes()))
    return final if final.is_file() else None


# --- presets and the command line -----------------------------------------------------------------


#: A lean network for CPU training: three stages at 1/4, 1/2 and 1 of a 2 mm input (8, 4 and 2 mm grids),
#: few channels and GRU iterations, one patch per stage, the motion encoder reading the cost volume through
#: 16 channels (through 4 the first stage learned far more slowly: benchmarks/results/learnability_cpu.md).
CPU_NETWORK = RWCNetConfig.tiny(
    stages=(StageConfig(scale=0.25, iterations=4, radius=2), StageConfig(scale=0.5, iterations=3, radius=2),
            StageConfig(scale=1.0, iterations=1, radius=1)),
    motion_channels=32,
)

#: A recipe that trains :data:`CPU_NETWORK` in under two hours on two CPU cores (``rwcflow-train
#: --print-config cpu``): synthetic pairs from the offline fsaverage and deepmriprep anatomies at 2 mm
#: (MNI152 held out for validation), the paper's losses plus the endpoint error to the known field, Adam
#: at the paper's 3e-4 with a cosine-decayed rate, two pairs per step, no dropout. Displacements reach 16
#: voxels (32 mm), so that the 8 mm grid of the first stage sees whole voxels of motion: with at most 6 its
#: cost volume held almost nothing to learn from and the network left every image where the affine put it
#: (benchmarks/results/model_cpu_displacement6.md); at Adam's 2e-3 the first stage did not even learn a
#: global translation in 300 steps (benchmarks/results/learnability_cpu.md). Its model, with stages 1 and 2
#: trained on (benchmarks/results/model_cpu_training/continuation.json), comes close to instance
#: optimisation but does not beat it (benchmarks/results/model_cpu.md): train on a GPU.
CPU_RECIPE = TrainConfig(
    model=CPU_NETWORK,
    data={"kind": "synthetic", "resolution_mm": 2.0, "validation_pairs": 0,
          "anatomies": ["fsaverage", "deepmriprep-ibsr", "deepmriprep-lpba40", "deepmriprep-hammers",
                        "deepmriprep-neuromorphometrics"],
          "options": {"max_displacement": 16.0, "anatomy_displacement": 2.0, "real_intensity": 0.8}},
    validation_data={"kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 2.0, "validation_pairs": 2,
                     "options": {"max_displacement": 16.0, "anatomy_displacement": 2.0, "real_intensity": 1.0}},
    steps=(1200, 700, 300),
    learning_rate=3e-4,
    lr_schedule="cosine",
    weights=LossWeights(similarity=10.0, dice=1.0, keypoints=0.1, diffusion=0.1, flow=1.0),
    train_patch_fraction=(1.0, 0.6, 0.4),
    batch_size=2,
    validate_every=100,
    checkpoint_every=20,
    num_workers=1,
    device="cpu",
)

#: The network to ship (``rwcflow-train --print-config gpu``): the paper's stages (iterations, radii,
#: patches) with three-level encoders, a narrower GRU and flow head and a wider motion encoder, 2.6 M
#: parameters (11 MB) where the paper's four-level encoders make 9.3 M (35 MB), too large to ship inside
#: the package. The motion encoder reads the cost volume through 32 channels (``motion_channels=64``):
#: through fewer the first stage learned a global translation more slowly, through 4 far more slowly
#: (benchmarks/results/learnability_cpu.md).
GPU_NETWORK = RWCNetConfig(hidden_channels=32, motion_channels=64, flow_head_channels=64,
                           encoder_blocks_down=(1, 2, 2), encoder_blocks_up=(1, 1))

#: Its recipe, for one GPU: :data:`CPU_RECIPE`'s synthetic pairs and losses, with displacements of up to
#: 10 voxels (20 mm at 2 mm, about what remains between brains after the affine), dropout 0.5 as in the
#: paper, mixed precision, and the pairs synthesised on the GPU (eight CPU loader processes kept an H100
#: waiting: 0.8 s per first-stage step), and Adam at the paper's 3e-4 (at 1e-3, with a 16-channel motion
#: encoder, stage 0 sat at the zero field for 700 steps on an H100). Scale ``steps`` to the time you have:
#: the stage logs give the seconds per step.
GPU_RECIPE = replace(
    CPU_RECIPE,
    model=GPU_NETWORK,
    data={**CPU_RECIPE.data, "options": {**CPU_RECIPE.data["options"], "max_displacement": 10.0}},
    validation_data={**CPU_RECIPE.validation_data, "validation_pairs": 4,
                     "options": {**CPU_RECIPE.validation_data["options"], "max_displacement": 10.0}},
    steps=(3000, 2000, 1000),
    train_patch_fraction=None,
    validate_every=250,
    checkpoint_every=50,
    num_workers=8,
    synthesize_on_device=True,
    device="auto",
)


def preset(name: str) -> TrainConfig:
    """Example configs: ``"paper"`` (the published network and recipe, on synthetic pairs), ``"tiny"``
    (seconds on a CPU, for trying things out), ``"cpu"`` (:data:`CPU_RECIPE`), ``"gpu"`` (:data:`GPU_RECIPE`)
    and ``"default"`` (the config the shipped default model was trained with)."""
    if name == "paper":
        return TrainConfig()
    if name == "tiny":
        return TrainConfig(model=RWCNetConfig.tiny(), steps=(20, 20, 10), validate_every=10,
                           data={"kind": "synthetic", "anatomies": ["mni152"], "resolution_mm": 6.0,
                                 "validation_pairs": 1})
    if name in ("cpu", "gpu"):
        return copy.deepcopy(CPU_RECIPE if name == "cpu" else GPU_RECIPE)
    if name == "default":
        path = default_model_path()
        if path is None:
            raise ValueError("no trained default model ships with this rwcflow")
        return TrainConfig.from_dict(read_metadata(path)["provenance"]["training"])
    raise ValueError(f"unknown preset {name!r}; expected paper, tiny, cpu, gpu or default")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwcflow-train",
        description="Train RWCNet stage by stage (resumes an interrupted run in the same folder).",
        epilog="Multi-GPU: torchrun --nproc_per_node=N -m rwcflow.train CONFIG OUT_DIR. "
               "Start from a preset: rwcflow-train --print-config paper > config.json",
    )
    parser.add_argument("config", nargs="?", type=Path, help="training config (JSON, or YAML with PyYAML)")
    parser.add_argument("out_dir", nargs="?", type=Path, help="run folder (checkpoints, logs, models)")
    parser.add_argument("--stages", type=int, nargs="+", help="stages to train, in order (default: all)")
    parser.add_argument("--init-model", type=Path, help="model file holding the stages before the first one trained")
    parser.add_argument("--device", help="override the config's device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--stop-at", type=int, help="stop (checkpointed) after this step of the first stage trained")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="stop (checkpointed) after this many minutes, with exit status 75; run again to go on")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", choices=("paper", "tiny", "cpu", "gpu", "default"),
                        help="print a preset config (default: the shipped model's) and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_config:
        try:
            print(json.dumps(preset(args.print_config).to_dict(), indent=2))
        except ValueError as exc:
            print(f"rwcflow-train: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.config is None or args.out_dir is None:
        parser.error("config and out_dir are required")
    deadline = None if args.time_limit is None else time.monotonic() + 60.0 * args.time_limit
    with command_logging(logging.INFO, logging.Formatter("%(message)s")):
        return _train(args, deadline)


def _check_against_config(args: argparse.Namespace, config: TrainConfig) -> None:
    """``--stages`` and ``--init-model`` against the config: the stages are the network's, and the first
    one's earlier stages are at hand: ``--init-model`` (of the same network) or, for a stage after 0, the
    earlier stage's model in ``out_dir``."""
    last = len(config.model.stages) - 1
    for stage in args.stages or []:
        if stage > last:
            raise InputError("--stages", f"must be {last} or less (the config's network has {last + 1} stages), "
                                         f"got {stage}")
    first_stage = (args.stages or [0])[0]
    if args.init_model is not None:
        if not _same_network(load_model(args.init_model).config, config.model):
            raise InputError(args.init_model, "--init-model: its network differs from the config's")
    elif first_stage > 0:
        earlier = Path(args.out_dir) / f"stage{first_stage - 1}" / "model.safetensors"
        if not earlier.is_file():
            raise InputError(earlier, f"--stages {first_stage}: needs stage {first_stage - 1}'s model, not found "
                                      f"(train stage {first_stage - 1} first, or give --init-model)")


def _train(args: argparse.Namespace, deadline: float | None) -> int:
    """Check the options, train, report (see :func:`main`)."""
    time_limit = None if args.time_limit is None else 60.0 * args.time_limit
    try:
        check_output_folder("out_dir", args.out_dir)
        check_at_least("--time-limit", args.time_limit, 0)
        check_at_least("--stop-at", args.stop_at, 1)
        for stage in args.stages or []:
            check_at_least("--stages", stage, 0)
        if args.init_model is not None:
            check_model("--init-model", str(args.init_model))
        if args.device:
            check_device("--device", args.device)
        config = load_config(args.config)
        if args.device:
            config = replace(config, device=args.device)
        else:
            check_device(f"{args.config}: device", config.device)
        _check_against_config(args, config)
        # the data sources open their files here, before anything is written into out_dir
        source = make_source(config.data)
        if config.validation_data:
            make_source(config.validation_data)
        if args.stop_at is not None:
            first_stage = (args.stages or [0])[0]
            init = args.init_model or (args.out_dir / f"stage{first_stage - 1}" / "model.safetensors"
                                       if first_stage > 0 else None)
            save_config(config, Path(args.out_dir) / "config.json")
            model = train_stage(config, first_stage, args.out_dir, init_model=init, source=source,
                                stop_at=args.stop_at, deadline=deadline, progress=not args.quiet)
        else:
            model = train(config, args.out_dir, stages=args.stages, init_model=args.init_model, source=source,
                          time_limit_s=time_limit, progress=not args.quiet)
    except (RwcflowError, OSError, ValueError) as exc:
        print(f"rwcflow-train: error: {exc}", file=sys.stderr)
        return 2
    if model is None and deadline is not None and time.monotonic() >= deadline:
        print(f"rwcflow-train: stopped after the {args.time_limit:g}-minute time limit, checkpointed in "
              f"{args.out_dir}; run the same command again to go on", file=sys.stderr)
        return EXIT_RESUME
    if isinstance(model, Path):
        print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
