"""``rwcflow-register``: register one moving image to one fixed image.

Writes into ``--out-dir``: ``warped.nii.gz`` (moving on the fixed grid), ``xfm.nii.gz`` (ITK/ANTs
displacement field of the whole fixed→moving mapping, affine included), ``affine.txt`` (ITK text
transform of the pre-alignment) and, with labels, ``warped_labels.nii.gz`` and ``metrics.json``. All
files appear together or not at all (:meth:`rwcflow.register.Registration.write`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rwcflow import __version__
from rwcflow.checks import check_at_least, check_device, check_model, check_output_folder
from rwcflow.console import command_logging
from rwcflow.errors import RwcflowError, os_error_line
from rwcflow.signals import Stopped, stop_on_signals
from rwcflow.register import register

PROG = "rwcflow-register"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed", required=True, type=Path, help="fixed (reference) image, NIfTI or MGZ")
    parser.add_argument("--moving", required=True, type=Path, help="moving image, NIfTI or MGZ")
    parser.add_argument("--out-dir", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--fixed-labels", type=Path, help="label map on the fixed grid (for metrics)")
    parser.add_argument("--moving-labels", type=Path, help="label map on the moving grid (warped, and metrics)")
    parser.add_argument("--fixed-mask", type=Path, help="brain mask on the fixed grid")
    parser.add_argument("--moving-mask", type=Path, help="brain mask on the moving grid")
    parser.add_argument("--model", default="default",
                        help="'default' (shipped model), 'none' (instance optimisation alone) or a model file")
    parser.add_argument("--io-iters", type=int, default=None,
                        help="instance-optimisation iterations (0 turns it off; default: rwcflow's default)")
    parser.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    parser.add_argument("--separate-affine", action="store_true",
                        help="xfm.nii.gz holds the deformable part only, to be applied after affine.txt "
                             "(antsApplyTransforms -t affine.txt -t xfm.nii.gz)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is happening")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with command_logging(logging.INFO if args.verbose else logging.WARNING,
                             logging.Formatter(f"{PROG}: %(message)s")), stop_on_signals():
            return _register(args)
    except RwcflowError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied while writing: not bad input
        print(f"{PROG}: error: {os_error_line(exc)}; nothing was written", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"{PROG}: stopped by {stop}; nothing was written", file=sys.stderr)
        return stop.exit_status


def _register(args: argparse.Namespace) -> int:
    """Check the options, register, write the outputs (all or none), report."""
    check_output_folder("--out-dir", args.out_dir)  # before minutes of computing
    check_at_least("--io-iters", args.io_iters, 0)
    check_model("--model", args.model)
    check_device("--device", args.device)
    result = register(
        args.fixed, args.moving,
        model=args.model,
        affine=not args.no_affine,
        instance_optimization=True if args.io_iters is None else args.io_iters,
        device=args.device,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
        fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
    )
    written = result.write(args.out_dir, include_affine=not args.separate_affine)
    if args.verbose:
        for path in written:
            print(path)
        print("time: " + ", ".join(f"{name[:-2]} {seconds:.1f} s" for name, seconds in result.timings.items()))
    if result.metrics is not None:
        print(f"Dice {result.metrics['dice_mean']:.3f}  folding {result.metrics['folding_percent']:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
