"""The model card of a trained RWCNet model: what it is, how it was trained, how well it does.

Built from the three things a shipped model comes with: the model file (network config and provenance
in its metadata), the training run folder of ``rwcflow-train`` (``config.json`` and each stage's
``log.csv``) and the JSON of ``benchmarks/bench_model.py`` run on the model. Writes Markdown:

    python -m benchmarks.model_card --model RUN/model.safetensors --run RUN \\
        --bench benchmarks/results/model_gpu.json --out rwcflow/data/default.md

A model trained on from an earlier one (``rwcflow-train ... --stages 1 2 --init-model``) gives every run
folder, in training order (``--run FIRST --run SECOND``; the config shown is the last run's, the
model's), and ``--history`` a Markdown file saying how the runs were chained, with their commands.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

from benchmarks.bench_model import METHODS, format_value, verdict_lines
from rwcflow.checkpoint import read_metadata
from rwcflow.io import atomic_write
from rwcflow.models import RWCNet, RWCNetConfig
from rwcflow.train import TrainConfig, load_config


def file_digest(path: Path) -> str:
    """The sha256 of a file, hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stage_logs(runs: list[Path], stages: int) -> list[dict]:
    """Per run folder and stage it trained (``stage{k}/log.csv``), in order: the run's number, the stage,
    steps trained, seconds, and the first and last validation rows. Every stage must be trained by one run."""
    found = []
    for k in range(stages):
        trained = [(i, run / f"stage{k}" / "log.csv") for i, run in enumerate(runs, start=1)]
        trained = [(i, log) for i, log in trained if log.is_file()]
        if not trained:
            raise ValueError(f"no run folder has stage {k}'s log (stage{k}/log.csv)")
        found += [_stage_log(i, k, log) for i, log in trained]
    return found


def _stage_log(run: int, stage: int, log: Path) -> dict:
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
        train_rows = [r for r in rows if r["split"] == "train"]
        validation = [r for r in rows if r["split"] == "val"]
    return {"run": run, "stage": stage, "steps": int(train_rows[-1]["step"]) if train_rows else 0,
            "seconds": float(rows[-1]["seconds"]) if rows else 0.0,
            "first_validation": validation[0] if validation else None,
            "last_validation": validation[-1] if validation else None}


def _value(row: dict | None, name: str, digits: int) -> str:
    return "–" if row is None or not row.get(name) else f"{float(row[name]):.{digits}f}"


def _network_section(network: RWCNetConfig, parameters: int) -> list[str]:
    lines = ["## Network", "",
             f"RWCNet, {len(network.stages)} stages, {parameters:,} parameters; features {network.feature_channels}, "
             f"hidden {network.hidden_channels}, encoder filters {network.encoder_filters}; correlation "
             f"{'on' if network.use_correlation else 'off'}, standardised costs {network.standardize_costs}, "
             f"{'diffeomorphic' if network.diffeomorphic else 'displacement'} updates; run at "
             f"{network.input_spacing_mm} mm voxels.", "",
             "| stage | grid scale | GRU iterations | correlation radius | patches per axis |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {s.scale:g} | {s.iterations} | {s.radius} | {s.patches} |"
              for k, s in enumerate(network.stages)]
    return lines


def _training_section(config: TrainConfig, logs: list[dict], provenance: dict) -> list[str]:
    data = json.dumps(config.data, sort_keys=True)
    validation = json.dumps(config.validation_data, sort_keys=True) if config.validation_data else "the training source's"
    weights = ", ".join(f"{name} {value:g}" for name, value in vars(config.weights).items() if value)
    lines = ["## Training", "",
             f"- Data: `{data}`", f"- Validation data: `{validation}`",
             f"- Recipe: stage by stage, earlier stages frozen; Adam, learning rate {config.learning_rate:g} "
             f"({config.lr_schedule}), batch {config.batch_size}, {config.similarity.upper()} similarity; "
             f"loss weights: {weights}; patch fraction per stage {config.train_patch_fraction}; "
             f"mixed precision {config.amp}; seed {config.seed}; {provenance.get('world_size', 1)} process(es); "
             f"rwcflow {provenance.get('rwcflow_version', '?')}.", "",
             "| run | stage | steps | minutes | validation EPE (mm), first → last | Dice, first → last |",
             "|---|---|---|---|---|---|"]
    for log in logs:
        first, last = log["first_validation"], log["last_validation"]
        lines.append(f"| {log['run']} | {log['stage']} | {log['steps']} | {log['seconds'] / 60:.1f} | "
                     f"{_value(first, 'epe_mm', 2)} → "
                     f"{_value(last, 'epe_mm', 2)} | {_value(first, 'dice', 3)} → {_value(last, 'dice', 3)} |")
    return lines


def _benchmark_section(bench: dict) -> list[str]:
    lines = ["## Benchmark", "",
             f"`benchmarks/bench_model.py` on {bench['device']}, {bench['date']}, torch {bench['versions']['torch']}, "
             f"cases at {bench.get('resolution_mm', 2.0):g} mm (none seen in training): "
             + ", ".join(sorted({r['case'] for r in bench["records"]})) + ". Means (EPE over the cases with a "
             "known mapping; Dice and times over all cases):", "",
             "| method | EPE mean (mm) | EPE p95 (mm) | Dice | network (s) | IO (s) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in bench["summary"]:
        lines.append(f"| {r['method']} | {r['epe_mm']:.2f} | {r['epe95_mm']:.2f} | {r['dice']:.3f} | "
                     f"{r['network_s']:.2f} | {r['io_s']:.2f} | {r['wall_s']:.2f} |")
    lines += ["", "Shipping rule (EPE lower and Dice not lower on these means):", "",
              *verdict_lines(bench["verdict"]), "", "Per case (EPE mean in mm / Dice / wall time in s):", "",
              "| case | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for case in dict.fromkeys(r["case"] for r in bench["records"]):
        found = {r["method"]: r for r in bench["records"] if r["case"] == case}
        cells = [f"{format_value(r.get('epe_mm'))} / {format_value(r['dice'], 3)} / {format_value(r['wall_s'], 1)}"
                 for r in (found[m] for m in METHODS)]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def model_card(model: Path, runs: list[Path], bench: dict, history: str | None = None) -> str:
    """The model card in Markdown (see the module docstring)."""
    metadata = read_metadata(model)
    network = RWCNetConfig.from_dict(metadata["config"])
    provenance = metadata["provenance"]
    config = load_config(runs[-1] / "config.json")
    logs = stage_logs(runs, len(network.stages))
    parameters = sum(p.numel() for p in RWCNet(network).parameters())
    digest = file_digest(model)
    if bench["model"].get("sha256") != digest:
        raise ValueError(f"{model}: the benchmark JSON was made for another model file (sha256 differs)")
    lines = [f"# Model card: {model.name}", "",
             f"`{model.name}`: {model.stat().st_size / 2**20:.1f} MB, sha256 `{digest}`, loaded without executing "
             "code (safetensors); its metadata holds the network config and the full training config.", "",
             "## Intended use", "",
             "Deformable registration of skull-stripped T1-weighted brain MRI after rwcflow's affine "
             "pre-alignment, as `--model` of `rwcflow-register`, the BIDS App and the Pydra tasks, alone "
             "or as the start of instance optimisation (the default). Trained on the data below only: "
             "other contrasts, pathology, infants and non-brain images are outside what it was shown.", "",
             *_network_section(network, parameters), "",
             *_training_section(config, logs, provenance), "",
             *_benchmark_section(bench), "",
             "## Reproduce", ""]
    if history:
        lines += [history.strip(), ""]
    else:
        lines += ["    rwcflow-train --print-config default > config.json   # this model's training config",
                  "    rwcflow-train config.json run/ [--time-limit MINUTES]   # resumable; exit status 75: run again",
                  "    python -m benchmarks.bench_model --model run/model.safetensors --device cuda --out bench.json",
                  "    python -m benchmarks.model_card --model run/model.safetensors --run run/ --bench bench.json "
                  "--out card.md", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model file")
    parser.add_argument("--run", type=Path, required=True, action="append",
                        help="its rwcflow-train run folder (repeated, in order, for a model trained on from another)")
    parser.add_argument("--bench", type=Path, required=True, help="bench_model's JSON for the model")
    parser.add_argument("--history", type=Path, help="Markdown: how several runs were chained, with their commands")
    parser.add_argument("--out", type=Path, required=True, help="the card, Markdown")
    args = parser.parse_args(argv)
    history = args.history.read_text() if args.history else None
    text = model_card(args.model, args.run, json.loads(args.bench.read_text()), history)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
