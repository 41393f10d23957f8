"""How fast a network configuration learns, measured on the easiest task there is: a global translation.

A quick diagnostic for network and recipe changes, minutes on a CPU, before spending GPU time on a
training run. Each pair is a synthetic training image (the recipe's anatomies and corruptions) and a
copy of it shifted by a random translation of up to ``--shift`` input voxels per axis, so the true field
is known and constant and every local cost volume holds it. The first stage of a fresh network trains on
such pairs through the real training step (:func:`rwcflow.train.prepare_stage`, ``stage_fields``,
``stage_loss``; Adam, gradient clipping) with the endpoint-error loss alone, and the script reports that
loss relative to the zero field's (1: nothing learned, 0: perfect), averaged over windows of steps.
A configuration that cannot learn this cannot learn anatomy.

    python -m benchmarks.learnability --preset cpu --steps 300 \\
        --variant 'lr=3e-4' --variant 'lr=3e-4 motion_channels=64' --variant 'lr=2e-3'

``--device`` (default: CUDA where there is one) runs the network and makes the pairs there. A variant
is ``KEY=JSON`` words: ``lr``, ``iterations`` and ``radius`` (the first stage's), or any
:class:`rwcflow.models.RWCNetConfig` field. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from rwcflow import spatial, train
from rwcflow.datasets import Pair, SyntheticSource, make_source
from rwcflow.models import RWCNet, RWCNetConfig


def parse_variant(text: str) -> dict:
    """``"lr=3e-4 motion_channels=64"`` as ``{"lr": 0.0003, "motion_channels": 64}``."""
    words = [word.split("=", 1) for word in text.split()]
    if not all(len(word) == 2 for word in words):
        raise ValueError(f"a variant is KEY=VALUE words, got {text!r}")
    return {key: json.loads(value) for key, value in words}


def translated_pair(source, generator: torch.Generator, shift: float) -> Pair:
    """A synthetic image and its copy translated by up to ``shift`` voxels per axis (fixed = moving shifted)."""
    sample = source.sample(generator)
    moving = sample.moving
    offset = (torch.rand(3, generator=generator) * 2 - 1) * shift
    field = offset.view(1, 3, 1, 1, 1).expand(1, 3, *moving.shape[2:]).contiguous().to(moving.device)
    fixed = spatial.warp(moving, field)
    return Pair(fixed, moving, sample.spacing, fixed_mask=(fixed > 0.05).float(), true_field=field)


def learning_curve(config: train.TrainConfig, variant: dict, steps: int, shift: float, window: int,
                   device: torch.device = torch.device("cpu"), seed: int = 0) -> dict:
    """Train stage 0 of ``config`` changed by ``variant`` on translated pairs on ``device`` (synthetic
    pairs made there too); the loss relative to the zero field's, averaged over each ``window`` of steps,
    and the seconds per step."""
    variant = dict(variant)
    lr = float(variant.pop("lr", config.learning_rate))
    first = {key: variant.pop(key) for key in ("iterations", "radius") if key in variant}
    stages = (replace(config.model.stages[0], **first), *config.model.stages[1:])
    network = RWCNetConfig.from_dict({**config.model.to_dict(), **variant, "stages": [vars(s) for s in stages]})
    weights = train.LossWeights(similarity=0.0, dice=0.0, keypoints=0.0, diffusion=0.0, flow=1.0)
    config = replace(config, model=network, weights=weights, amp=False)
    source = make_source(config.data)
    if isinstance(source, SyntheticSource):
        source = source.to(device)
    torch.manual_seed(seed)
    model = RWCNet(network).to(device).train()
    stage = model.stages[0]
    optimizer = torch.optim.Adam(stage.parameters(), lr=lr)
    ratios, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pair = translated_pair(source, generator, shift).to(device)
        batch = train.prepare_stage(model, 0, pair, generator=generator)
        loss, terms = train.stage_loss(train.stage_fields(model, 0, batch), batch, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), config.grad_clip)
        optimizer.step()
        zero_field = train.field_terms(torch.zeros_like(batch.field[batch.index]), batch, config)["flow"]
        ratios.append(terms["flow"] / float(zero_field))
    seconds = (time.perf_counter() - start) / steps
    windows = [sum(ratios[i : i + window]) / len(ratios[i : i + window]) for i in range(0, steps, window)]
    return {"lr": lr, "network": network.to_dict(), "relative_loss": windows, "seconds_per_step": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="rwcflow-train preset giving the network, data and rate")
    parser.add_argument("--variant", action="append", default=[], help="KEY=JSON words (repeatable); none: the preset")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50, help="steps per reported average")
    parser.add_argument("--shift", type=float, default=3.0, help="largest translation per axis, input voxels")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learnability_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = train.preset(args.preset)
    device = train._device(args.device, 0)
    rows = []
    for text in args.variant or [""]:
        curve = learning_curve(config, parse_variant(text), args.steps, args.shift, args.window, device)
        rows.append({"variant": text or args.preset, **curve})
        print(f"{rows[-1]['variant']}: {' '.join(f'{r:.2f}' for r in curve['relative_loss'])}", flush=True)
    steps = [min(args.steps, (i + 1) * args.window) for i in range(len(rows[0]["relative_loss"]))]
    lines = [f"| variant | s/step | {' | '.join(f'to step {s}' for s in steps)} |",
             "|---|---|" + "---|" * len(steps)]
    lines += [f"| {row['variant']} | {row['seconds_per_step']:.2f} | "
              f"{' | '.join(f'{r:.2f}' for r in row['relative_loss'])} |" for row in rows]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(), "preset": args.preset,
        "steps": args.steps, "window": args.window, "shift": args.shift, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Learning a global translation (stage 0, endpoint-error loss relative to the zero field's)\n\n"
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, {platform.platform()}, torch "
        f"{torch.__version__}, {device}, {torch.get_num_threads()} threads; preset `{args.preset}`, translations up to "
        f"{args.shift:g} input voxels per axis, mean over each {args.window} steps (1: nothing learned).\n\n"
        f"{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
