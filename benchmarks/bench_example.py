"""The README's main job, timed and checked: ``make run-example`` with default options on a fresh demo.

Run from the repository root: ``python -m benchmarks.bench_example [--folder DIR] [--from-run DIR]``.
It runs ``make run-example`` (the demo dataset, the App's participant and group levels with their
default options, then ``rwcflow-demo-check``) into a new folder, unless ``--from-run`` names a folder
where that ran, and reads what the run wrote: per level its wall time (from the App's log file), the
registrations, rigid midspaces and groupwise refinements it ran (count, and the job time each took: jobs
run two at a time on two CPUs, so job times add up to more than the wall time), and the demo check's rows. Prints a
Markdown table and writes ``benchmarks/results/example_<device>.{json,md}``.

The targets it is measured against: the whole ``make run-example`` (the demo data, both levels, the
check) within 5 minutes on the 2-core machine, every participant's recovered change within ±0.5
percentage points of the truth and a far field under 0.005, and the group template's error against the
true mean shape at most half the plain average's. With Chromium installed
(:mod:`benchmarks.report_screenshot`) it also saves a screenshot of ``sub-01.html``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from benchmarks import report_screenshot
from benchmarks.system import REPOSITORY, environment
from rwcflow.bids_app.demo_check import ChangeRow, TemplateRow, table as check_table, template_table

LEVELS = ("participant", "group")
TARGET_S = 300.0
STEPS = {"registration": re.compile(r"registered in ([\d.]+) s$"),
         "rigid midspace": re.compile(r"rigid midspace of .+: done in ([\d.]+) s$"),
         "groupwise refinement": re.compile(r"groupwise refinement of .+: done in ([\d.]+) s$"),
         "averaging": re.compile(r"images: averaged in ([\d.]+) s$"),
         "template update": re.compile(r"template update \d+ .*: updated in ([\d.]+) s$"),
         "report": re.compile(r"report written in ([\d.]+) s$")}


def run_example(folder: Path) -> float:
    """``make run-example`` into ``folder`` with this Python's installation; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(["make", "--no-print-directory", "-C", str(REPOSITORY), "run-example",
                    f"BIN={Path(sys.executable).parent}", f"EXAMPLE={folder.absolute()}"], check=False)
    return time.perf_counter() - start


def level_times(log: Path) -> dict:
    """Wall time (first to last line) and per step kind the count and summed job time of one level's log."""
    stamps, steps = [], {name: [] for name in STEPS}
    for line in log.read_text().splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)", line)
        if not stamp:
            continue
        stamps.append(datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f"))
        for name, pattern in STEPS.items():
            if found := pattern.search(stamp[2]):
                steps[name].append(float(found[1]))
    return {"wall_s": round((stamps[-1] - stamps[0]).total_seconds(), 1),
            "steps": {name: {"count": len(times), "job_s": round(sum(times), 1)} for name, times in steps.items()}}


def measure(folder: Path) -> dict:
    """The timings of the levels and the demo check of a ``make run-example`` folder."""
    logs = folder / "derivatives" / "logs"
    levels = {}
    for level in LEVELS:
        found = sorted(logs.glob(f"rwcflow-{level}-*.log"))
        if len(found) != 1:
            raise SystemExit(f"{logs}: expected one {level} log of a fresh run, found {len(found)}")
        levels[level] = level_times(found[0])
    check = json.loads((folder / "derivatives" / "demo_validation.json").read_text())
    return {"levels": levels, "both_levels_s": round(sum(level["wall_s"] for level in levels.values()), 1),
            "check": check}


def table(result: dict) -> str:
    lines = ["| level | wall time | " + " | ".join(f"{name} (count, time)" for name in STEPS) + " |",
             "|---|---|" + "---|" * len(STEPS)]
    for level, times in result["levels"].items():
        steps = [times["steps"][name] for name in STEPS]
        lines.append(f"| {level} | {times['wall_s']:.0f} s | "
                     + " | ".join(f"{step['count']}, {step['job_s']:.1f} s" for step in steps) + " |")
    total = result["make_wall_s"]
    lines += ["", f"Both levels: {result['both_levels_s']:.0f} s."]
    if total is not None:
        verdict = "within" if total <= TARGET_S else "over"
        lines[-1] += (f" The whole `make run-example` (demo data, both levels, check): {total:.0f} s ({verdict} the "
                      f"{TARGET_S:.0f} s target).")
    names = [field.name for field in fields(ChangeRow)]  # the JSON rows also hold error_pp and passed
    rows = [ChangeRow(**{name: row[name] for name in names}) for row in result["check"]["rows"]]
    lines += ["", check_table(rows)]
    if (group := result["check"].get("group_template")) is not None:
        names = [field.name for field in fields(TemplateRow)]
        lines += ["", template_table(TemplateRow(**{name: group[name] for name in names}))]
    if result.get("screenshot"):
        lines += ["", f"sub-01's report: `{result['screenshot']}`."]
    return "\n".join(lines)


def take_screenshot(folder: Path, out: Path) -> str | None:
    """``sub-01.html`` of the run in ``folder`` as ``out/example_cpu_sub-01_report.png``; its path relative to
    the repository, or ``None`` (said why) without Chromium."""
    try:
        png = report_screenshot.screenshot(folder / "derivatives" / "sub-01.html", out / "example_cpu_sub-01_report.png")
    except RuntimeError as exc:
        print(f"no screenshot of sub-01.html: {exc}", file=sys.stderr)
        return None
    return str(png.relative_to(REPOSITORY)) if png.is_relative_to(REPOSITORY) else str(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="where to run the example (default: a new temporary folder)")
    parser.add_argument("--from-run", type=Path, help="a folder where make run-example ran: measure it, run nothing")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "benchmarks" / "results")
    args = parser.parse_args(argv)
    folder = args.from_run
    total = None
    if folder is None:
        folder = args.folder or Path(tempfile.mkdtemp(prefix="rwcflow-example-"))
        total = round(run_example(folder), 1)
    result = {"command": "make run-example (default options)", "folder": str(folder), "make_wall_s": total,
              **measure(folder), "screenshot": take_screenshot(folder, args.out), "environment": environment()}
    text = table(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "example_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "example_cpu.md").write_text(
        f"# `make run-example` with default options\n\n{result['environment']['processor']}, "
        f"{result['environment']['cpu_count']} CPUs, {result['environment']['date']}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
