"""Speed and memory of ``register()`` at 64³, 128³ and 160×192×224, on CPU and (when present) CUDA.

Two configurations: instance optimisation alone (``model=None``, rwcflow's CPU path) and an untrained
RWCNet forward pass of all three stages with the paper's configuration (no instance optimisation).
Both include the affine pre-alignment; the table splits the time into its parts. Every run is its own
process, so peak memory (process RSS; CUDA max allocated) is that run's alone.

    python -m benchmarks.bench_register [--sizes 64 128 full] [--methods io rwcnet] \
        [--devices cpu cuda] [--threads 2] [--timeout 1800] [--out benchmarks/results/...json]

Prints a Markdown table and saves JSON with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.system import environment, peak_rss_mb, spawn

SIZES = {"64": (64, 64, 64), "128": (128, 128, 128), "full": (160, 192, 224)}
METHODS = ("io", "rwcnet")


def _pair(shape: tuple[int, int, int]):
    """MNI152 (nilearn, skull-stripped) on a grid of ``shape`` covering the brain, and a deformed copy."""
    import numpy as np
    from nilearn import datasets

    from rwcflow import spatial
    from rwcflow.io import Grid, Image, resample
    from rwcflow.synth import random_smooth_field

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    brain = Image(np.where(mask, t1.get_fdata(), 0).astype(np.float32), t1.affine)
    corners = np.argwhere(mask)
    low = t1.affine[:3, :3] @ corners.min(0) + t1.affine[:3, 3] - 4
    high = t1.affine[:3, :3] @ corners.max(0) + t1.affine[:3, 3] + 4
    spacing = (high - low) / (np.array(shape) - 1)
    grid = Grid(shape, np.vstack([np.hstack([np.diag(spacing), low[:, None]]), [0, 0, 0, 1]]))
    fixed = resample(brain, grid)
    field = random_smooth_field(shape, 8.0 / spacing.mean(), seed=0)
    moving = fixed.with_data(spatial.warp(fixed.tensor(), field)[0, 0].numpy())
    return fixed, moving


def run_one(size: str, method: str, device: str, threads: int) -> dict:
    """One timed ``register()`` in this process."""
    import torch

    from rwcflow.models import RWCNet
    from rwcflow.register import register

    torch.set_num_threads(threads)
    fixed, moving = _pair(SIZES[size])
    model = RWCNet().to(device).eval() if method == "rwcnet" else None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = register(fixed, moving, model=model, instance_optimization=method == "io", device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    record = {
        "size": "x".join(map(str, SIZES[size])),
        "method": method,
        "device": device,
        "threads": threads,
        "wall_s": wall,
        **{k: v for k, v in result.timings.items()},
        "peak_rss_mb": peak_rss_mb(),
    }
    if device == "cuda":
        record["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["gpu"] = torch.cuda.get_device_name()
    return record


def _spawn(size: str, method: str, device: str, threads: int, timeout: float) -> dict:
    label = {"size": "x".join(map(str, SIZES[size])), "method": method, "device": device, "threads": threads}
    record, status = spawn("benchmarks.bench_register", ["--worker", size, method, device, str(threads)],
                           threads=threads, timeout=timeout)
    return {**label, **(record or {}), "status": status}


def table(records: list[dict]) -> str:
    rows = ["| size | method | device | threads | wall (s) | affine (s) | network (s) | IO (s) | peak RSS (MB) | CUDA max alloc (MB) | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        def cell(key, fmt="{:.1f}"):
            return fmt.format(r[key]) if key in r else "–"
        rows.append(f"| {r['size']} | {r['method']} | {r['device']} | {r['threads']} | {cell('wall_s', '{:.2f}')} "
                    f"| {cell('affine_s')} | {cell('network_s', '{:.2f}')} | {cell('instance_optimization_s')} "
                    f"| {cell('peak_rss_mb', '{:.0f}')} | {cell('cuda_max_allocated_mb', '{:.0f}')} | {r['status']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("SIZE", "METHOD", "DEVICE", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when present")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/register_speed_<device>.json)")
    args = parser.parse_args(argv)
    if args.worker:
        size, method, device, threads = args.worker
        print(json.dumps(run_one(size, method, device, int(threads))))
        return 0

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    records = []
    for device in devices:
        for size in args.sizes:
            for method in args.methods:
                record = _spawn(size, method, device, args.threads, args.timeout)
                print(f"{record['size']} {method} {device}: {record.get('wall_s', float('nan')):.2f} s ({record['status']})",
                      flush=True)
                records.append(record)
    print(table(records))
    out = args.out or Path(__file__).parent / "results" / f"register_speed_{'_'.join(devices)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "results": records}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(records) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
