"""Tables, JSON and figures of a benchmark run.

A run is a dict ``{"environment", "settings", "skipped": {spec: reason}, "records": [...]}`` (and
optionally ``"notes"``, lines shown under the header); a
record is one case registered by one method: ``case``, ``group``, ``method``, ``status`` (``ok``,
``failed: ...``, ``timeout ...``), ``wall_s``, ``peak_rss_mb``, ``threads``, ``time_ratio_ants``
and ``metrics`` (:func:`benchmarks.evaluate.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

ANTS = "ants-syn"


def add_time_ratios(records: list[dict]) -> None:
    """Set ``time_ratio_ants``: a record's wall time over ANTs SyN's on the same case (when ANTs ran)."""
    ants = {r["case"]: r["wall_s"] for r in records if r["method"] == ANTS and r["status"] == "ok"}
    for record in records:
        if record["status"] == "ok" and record["case"] in ants:
            record["time_ratio_ants"] = record["wall_s"] / ants[record["case"]]


def _metric(record: dict, key: str) -> float | None:
    """A finite number of the record's metrics (or of the record itself), else None."""
    value = record.get("metrics", {}).get(key, record.get(key))
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _case_columns() -> list[tuple[str, Callable[[dict], str], str | None]]:
    """(header, cell of a record, metric some record must hold for the column to be shown)."""
    def dice(r):
        mean = _metric(r, "dice_mean")
        return "–" if mean is None else f"{mean:.3f} ± {_metric(r, 'dice_std') or 0.0:.3f}"

    def epe(r):
        mean, p95 = _metric(r, "epe_mean_mm"), _metric(r, "epe_p95_mm")
        return "–" if mean is None else f"{mean:.2f} / {p95:.2f}"

    def tre(r):
        mean, p95 = _metric(r, "tre_mm"), _metric(r, "tre_p95_mm")
        return "–" if mean is None else f"{mean:.2f} / {p95:.2f}"

    return [
        ("Dice (mean ± std over labels)", dice, "dice_mean"),
        ("HD95 (mm)", lambda r: _number(_metric(r, "hd95_mean"), 2), "hd95_mean"),
        ("SDlogJ", lambda r: _number(_metric(r, "sdlogj"), 4), None),
        ("std log J", lambda r: _number(_metric(r, "std_log_jacobian"), 4), None),
        ("folding %", lambda r: _number(_metric(r, "folding_percent"), 4), None),
        ("EPE mean / p95 (mm)", epe, "epe_mean_mm"),
        ("TRE mean / p95 (mm)", tre, "tre_mm"),
        ("wall (s)", lambda r: _number(r.get("wall_s"), 1), None),
        ("× ANTs SyN", lambda r: _number(r.get("time_ratio_ants"), 2), None),
        ("peak RSS (MB)", lambda r: _number(r.get("peak_rss_mb"), 0), None),
        ("CUDA peak (MB)", lambda r: _number(r.get("cuda_max_allocated_mb"), 0), "cuda_max_allocated_mb"),
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _present(records: list[dict], key: str | None) -> bool:
    return key is None or any(_metric(r, key) is not None for r in records)


def case_table(records: list[dict]) -> str:
    """The Markdown table of one case: one row per method."""
    columns = [c for c in _case_columns() if _present(records, c[2])]
    rows = [[r["method"], *(cell(r) if r["status"] == "ok" else "–" for _, cell, _ in columns), r["status"]]
            for r in records]
    return _table(["method", *(c[0] for c in columns), "status"], rows)


def group_table(records: list[dict]) -> str:
    """Means (± std over cases) per method over the cases of one group."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_method[record["method"]].append(record)
    keys = [("Dice", "dice_mean", 3), ("HD95 (mm)", "hd95_mean", 2), ("SDlogJ", "sdlogj", 4),
            ("folding %", "folding_percent", 4), ("EPE mean (mm)", "epe_mean_mm", 2), ("TRE (mm)", "tre_mm", 2)]
    keys = [k for k in keys if _present(records, k[1])]
    rows = []
    for method, runs in by_method.items():
        ok = [r for r in runs if r["status"] == "ok"]
        row = [method, f"{len(ok)}/{len(runs)}"]
        row += [_mean_std([v for r in ok if (v := _metric(r, key)) is not None], digits) for _, key, digits in keys]
        row += [_mean_std([r["wall_s"] for r in ok], 1),
                _mean_std([r["time_ratio_ants"] for r in ok if "time_ratio_ants" in r], 2),
                _mean_std([v for r in ok if (v := _metric(r, "peak_rss_mb")) is not None], 0)]
        rows.append(row)
    header = ["method", "cases ok", *(k[0] for k in keys), "wall (s)", "× ANTs SyN", "peak RSS (MB)"]
    return _table(header, rows)


def _grouped(records: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record[key]].append(record)
    return groups


def markdown(run: dict) -> str:
    """The whole report: settings, skipped methods, a summary per group, then a table per case."""
    env, settings = run["environment"], run["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in {**env.get("versions", {}), **env.get("peers", {})}.items() if v)
    lines = [
        f"# rwcflow benchmark ({settings.get('mode')} mode{', selected cases/methods' if settings.get('selected') else ''})",
        "",
        f"{env['date']} · {env['processor']} ({env['cpu_count']} CPUs, {env.get('memory_gb', '?')} GB)"
        f"{' · GPU ' + env['cuda'] if env.get('cuda') else ''} · device {settings['device']} · "
        f"{settings['threads']} thread(s) per run · Python {env['python']} · {versions}", "",
    ]
    loads = [r["load_average"] for r in run["records"] if "load_average" in r]
    if loads:
        lines += [f"Machine load (1-min load average, mean of the values at the start and end of each run): "
                  f"{np.mean(loads):.1f} on average, {min(loads):.1f}–{max(loads):.1f}; above the CPU count, "
                  "other work shared the CPUs and wall times are longer than on an idle machine.", ""]
    dates = sorted({r["date"] for r in run["records"] if "date" in r})
    if len({date[:10] for date in dates}) > 1:
        lines += [f"Runs measured in several sittings (resumed), from {dates[0]} to {dates[-1]}: each record "
                  "in the JSON has its date.", ""]
    notes = [f"skipped {spec}: {reason}" for spec, reason in run.get("skipped", {}).items()] + run.get("notes", [])
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["Dice/HD95 over the labels both images hold; SDlogJ, std log J and folding of the whole "
              "fixed→moving mapping (Learn2Reg definitions); EPE inside the brain (synthetic cases); wall "
              "time of the registration alone; peak RSS of the process (or tool) that registered.", ""]
    groups = _grouped(run["records"], "group")
    lines += ["## Summary per group", ""]
    for group, records in groups.items():
        lines += [f"### {group} ({len({r['case'] for r in records})} case(s))", "", group_table(records), ""]
    lines += ["## Per case", ""]
    for case, records in _grouped(run["records"], "case").items():
        lines += [f"### {case}", "", case_table(records), ""]
    return "\n".join(lines)


def draw(records: list[dict], prefix: Path) -> list[Path]:
    """``<prefix>_dice_time.png`` (mean Dice against mean wall time per method, one panel per group)
    and ``<prefix>_label_dice.png`` (box plots of per-label Dice per method, pooled over a group)."""
    try:
        import matplotlib
    except ImportError:
        print("no figures: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {g: rs for g, rs in _grouped([r for r in records if r["status"] == "ok"], "group").items()
              if _present(rs, "dice_mean")}
    if not groups:
        return []
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    written = []
    for kind in ("dice_time", "label_dice"):
        figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
        for axis, (group, rs) in zip(axes.flat, groups.items()):
            by_method = _grouped(rs, "method")
            if kind == "dice_time":
                for method, runs in by_method.items():
                    dice = [v for r in runs if (v := _metric(r, "dice_mean")) is not None]
                    wall = max(float(np.mean([r["wall_s"] for r in runs])), 1e-2)
                    axis.scatter(wall, np.mean(dice), s=40)
                    axis.annotate(method, (wall, np.mean(dice)), fontsize=8, xytext=(4, 3), textcoords="offset points")
                axis.set_xscale("log")
                axis.set_xlabel("wall time (s, log)")
                axis.set_ylabel("mean Dice")
            else:
                names = list(by_method)
                data = [[v for r in by_method[m] for v in r["metrics"].get("dice", {}).values() if v is not None]
                        for m in names]
                axis.boxplot(data, showfliers=False)
                axis.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
                axis.set_ylabel("Dice per label")
            axis.set_title(group, fontsize=10)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(groups):]:
            axis.set_visible(False)
        figure.tight_layout()
        path = prefix.with_name(f"{prefix.name}_{kind}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_report(run: dict, prefix: Path, *, figures: bool = True) -> list[Path]:
    """Write ``<prefix>.json``, ``<prefix>.md`` and (with ``figures``) the figures; the paths written."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(run, indent=2) + "\n")
    md_path.write_text(markdown(run) + "\n")
    return [json_path, md_path, *(draw(run["records"], prefix) if figures else [])]


def main(argv: list[str] | None = None) -> int:
    """Re-render the Markdown and the figures of a saved run: ``python -m benchmarks.report RUN.json``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_json", type=Path)
    args = parser.parse_args(argv)
    run = json.loads(args.run_json.read_text())
    written = write_report(run, args.run_json.with_suffix(""))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
