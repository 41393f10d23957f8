"""``rwcflow bids_dir output_dir {participant,group}``: the BIDS App command line (BIDS Apps spec, with
fMRIPrep's flags where they mean the same).

Exit codes: 0 all done; 1 some participants failed (the others completed), or the group template's jobs
failed: one line each names the failed job, its exception and message, and the crash file with its
traceback; 2 bad input or usage (one line naming the file and the problem, nothing run); 130/143 stopped
by SIGINT/SIGTERM (every job stopped; the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rwcflow import __version__
from rwcflow.checks import check_at_least, check_device, check_model, check_output_folder
from rwcflow.console import command_logging
from rwcflow.cpus import available_cpus
from rwcflow.errors import JobsFailed, RwcflowError, os_error_line
from rwcflow.run_lock import WorkFolderLock
from rwcflow.signals import Stopped, stop_on_signals

from . import dataset, derivatives
from .failures import record_failure
from .options import GROUP_ITERATIONS, REFINE_ITERS, RunOptions, limit_threads
from .spaces import BUILTIN, UNBIASED, TemplateChoice, resolve_template

log = logging.getLogger("rwcflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwcflow", description="RWCNet registration of BIDS datasets: longitudinal within-subject templates "
                                    "and Jacobian change maps (participant level), unbiased group templates (group level).")
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (only ever read)")
    parser.add_argument("output_dir", type=Path, help="the derivatives folder (outside the input dataset)")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"rwcflow {__version__}")

    selection = parser.add_argument_group("selecting data")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                           help="participants to process (with or without 'sub-'); default: all")
    selection.add_argument("--session-label", nargs="+", metavar="LABEL",
                           help="sessions to use (with or without 'ses-'); default: all")
    selection.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                           help='JSON query for the structural images, as in fMRIPrep: {"t1w": {"acquisition": "mprage"}}')
    selection.add_argument("--modality", default="T1w", help="suffix of the structural images (default: T1w)")
    selection.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                           help="do not run the BIDS validator on the input")

    registration = parser.add_argument_group("registration")
    registration.add_argument("--template", default=UNBIASED, metavar="TEMPLATE",
                              help=f"group template: a NIfTI file, {BUILTIN}[:res-2][:desc-brain] (shipped with "
                                   f"nilearn), or '{UNBIASED}' (built from the data by the group level; default)")
    registration.add_argument("--model", default="default", help="RWCNet model: default | none | a model file")
    registration.add_argument("--io-iters", type=int, metavar="N",
                              help="instance-optimisation steps per level (0: off; default: rwcflow's)")
    registration.add_argument("--refine-iters", type=int, default=REFINE_ITERS, metavar="N",
                              help=f"L-BFGS iterations of the joint refinement of each participant's session maps "
                                   f"(0: off; default {REFINE_ITERS})")
    registration.add_argument("--group-iterations", type=int, default=GROUP_ITERATIONS, metavar="K",
                              help=f"group template updates (default {GROUP_ITERATIONS})")
    registration.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    registration.add_argument("--random-seed", type=int, default=0, metavar="SEED",
                              help="seed of every random generator (same inputs, seed and hardware: same outputs)")

    execution = parser.add_argument_group("execution")
    execution.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                           help="Pydra's cache: re-running with the same one resumes (default: ./work)")
    execution.add_argument("--wait-for-lock", action="store_true",
                           help="when another run holds the work folder, wait for it to finish instead of stopping")
    execution.add_argument("--nprocs", "--n-cpus", type=int, default=available_cpus(),
                           help="CPUs to use in all (default: those this process may use: CPU affinity, cgroup "
                                "quota, SLURM_CPUS_PER_TASK)")
    execution.add_argument("--omp-nthreads", type=int, metavar="N",
                           help="threads per job (default: --nprocs for the participant level run locally, whose "
                                "jobs follow one another; else 1, as the group level's registrations run side by side)")
    execution.add_argument("--plugin", choices=["cf", "slurm"], default="cf",
                           help="Pydra worker: cf (local processes) or slurm (one SLURM job per task, each running "
                                "this Python installation: rwcflow must be installed where the nodes see it)")
    execution.add_argument("--slurm-args", default="", metavar="ARGS",
                           help='sbatch options for every job with --plugin slurm, e.g. "-p gpu --gres=gpu:1" '
                                '(a single option with "=": --slurm-args=--mem=8G); --cpus-per-task defaults to '
                                '--omp-nthreads')
    execution.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: debug)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join([parser.prog, *map(str, sys.argv[1:] if argv is None else argv)])  # for the reports
    # progress (per participant, per registration) on stderr; -v adds rwcflow's details, -vv Pydra's
    logging.getLogger("pydra").setLevel(logging.DEBUG if args.verbose >= 2 else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s rwcflow: %(message)s", "%H:%M:%S")
    try:
        with command_logging(logging.DEBUG if args.verbose >= 1 else logging.INFO, formatter), stop_on_signals():
            return run(args)
    except RwcflowError as exc:
        print(f"rwcflow: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, a folder the container does not see
        print(f"rwcflow: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"rwcflow: stopped by {stop}: every job stopped, nothing half-written; run the same command "
              f"again (same work folder) to resume", file=sys.stderr)
        return stop.exit_status


def run(args: argparse.Namespace) -> int:
    """Check everything, then run the level (one run at a time per work folder)."""
    bids_dir, output_dir, work_dir = args.bids_dir.absolute(), args.output_dir.absolute(), args.work_dir.absolute()
    dataset.check_dataset(bids_dir)
    dataset.check_output_location(bids_dir, output_dir, "output folder")
    dataset.check_output_location(bids_dir, work_dir, "work folder")
    check_options(args, output_dir, work_dir)
    if not args.skip_bids_validation:
        dataset.validate(bids_dir)
    filters = dataset.read_filters(args.bids_filter_file)
    participants = dataset.find_participants(bids_dir, participants=args.participant_label,
                                             sessions=args.session_label, modality=args.modality, filters=filters)
    dataset.check_images(participants)
    template = resolve_template(args.template, work_dir)  # a file is read; a built-in one is written, once
    work_dir.mkdir(parents=True, exist_ok=True)
    with WorkFolderLock(work_dir, wait=args.wait_for_lock):
        return _run_level(args, participants, template, bids_dir, output_dir, work_dir)


def check_options(args: argparse.Namespace, output_dir: Path, work_dir: Path) -> None:
    """Every option, before any work: one line naming the option or file and the problem."""
    check_output_folder("output folder", output_dir)
    check_output_folder("--work-dir", work_dir)
    if args.omp_nthreads is None:
        args.omp_nthreads = default_omp_nthreads(args.analysis_level, args.plugin, args.nprocs)
    for option, value, minimum in (("--nprocs", args.nprocs, 1), ("--omp-nthreads", args.omp_nthreads, 1),
                                   ("--io-iters", args.io_iters, 0),
                                   ("--refine-iters", args.refine_iters, 0),
                                   ("--group-iterations", args.group_iterations, 1),
                                   ("--random-seed", args.random_seed, 0)):
        check_at_least(option, value, minimum)
    check_model("--model", args.model)
    check_device("--device", args.device)


def default_omp_nthreads(level: str, plugin: str, nprocs: int) -> int:
    """Threads per job when ``--omp-nthreads`` is not given: a participant's workflow run locally is a chain
    (rigid midspace, refinement, then small per-session jobs), so each job takes every CPU; the group
    level's registrations run side by side, one thread each, and SLURM jobs ask for one CPU each."""
    return max(1, nprocs) if level == "participant" and plugin == "cf" else 1


def _run_level(args: argparse.Namespace, participants: list, template: TemplateChoice, bids_dir: Path,
               output_dir: Path, work_dir: Path) -> int:
    """Run the level, holding the work folder; the number of failed participants decides the exit code."""
    # a model file's path as given here: jobs run in their own folders
    model = args.model if args.model in ("default", "none") else str(Path(args.model).absolute())
    options = RunOptions(template=template, work_dir=work_dir, model=model,
                         io_iters=args.io_iters, device=args.device,
                         refine_iters=args.refine_iters,
                         group_iterations=args.group_iterations, nprocs=args.nprocs,
                         omp_nthreads=args.omp_nthreads, plugin=args.plugin, slurm_args=args.slurm_args,
                         seed=args.random_seed, command=args.command)
    _seed(options.seed)
    limit_threads(options.omp_nthreads)
    output_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(output_dir, args.analysis_level)
    derivatives.dataset_description(output_dir, bids_dir)
    from .reports import citation_text  # matplotlib and nilearn's plotting: imported only to run a level

    derivatives.write_text(output_dir / "logs" / "CITATION.md", citation_text(options.parameters()))
    log.info("rwcflow %s, %s level: %d participant(s), template %s", __version__, args.analysis_level,
             len(participants), options.template.name)
    start = time.perf_counter()
    if args.analysis_level == "participant":
        from .participant import run_participants

        failed = run_participants(participants, bids_dir, output_dir, options)
    else:
        from .group import run_group

        try:
            failed = run_group(participants, bids_dir, output_dir, options)
        except Exception as exc:
            if isinstance(exc, RwcflowError) and not isinstance(exc, JobsFailed):
                raise  # bad input: one line, exit status 2
            log.error("group level failed: %s", record_failure(exc, output_dir, options.run_id))
            return 1
    log.info("finished in %.0f s: %d done, %d failed%s", time.perf_counter() - start,
             len(participants) - len(failed), len(failed), f" ({', '.join(f'sub-{f}' for f in failed)})" if failed else "")
    return 1 if failed else 0


def _seed(seed: int) -> None:
    """Seed Python, NumPy and torch here; forked jobs inherit the state, so reruns are identical."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log_to_file(output_dir: Path, level: str) -> None:
    """Also keep the messages in ``output_dir/logs/rwcflow-<level>-<time>[-job<id>].log`` (the SLURM job,
    or array job and task, when run as one: array tasks starting in the same second keep separate logs)."""
    folder = output_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    job = "_".join(filter(None, (os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
                                 os.environ.get("SLURM_ARRAY_TASK_ID"))))
    name = f"rwcflow-{level}-{time.strftime('%Y%m%d-%H%M%S')}{f'-job{job}' if job else ''}.log"
    handler = logging.FileHandler(folder / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


if __name__ == "__main__":
    raise SystemExit(main())
