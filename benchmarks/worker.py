"""One registration in its own process: the unit :mod:`benchmarks.run` spawns for each case and method.

    python -m benchmarks.worker --case CASE_JSON --method SPEC --out DIR [--context JSON]

Registers the case with the method, writes the whole fixed→moving mapping as ``DIR/xfm.nii.gz``
(an ITK displacement field on the fixed grid) and prints one JSON line: the registration's wall
time, its breakdown, the thread count, and the peak memory of this process or of the tool it ran
(read before the output is converted), plus CUDA's peak allocation on a GPU. A failure exits
non-zero with the reason as the last line of standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.cases import Case
from benchmarks.methods import Context, make_method
from benchmarks.system import peak_rss_mb

XFM = "xfm.nii.gz"


def run(case: Case, spec: str, out: Path, context: Context) -> dict:
    """Register ``case`` with ``spec`` and write ``out/xfm.nii.gz``; the run's record."""
    method = make_method(spec)
    out.mkdir(parents=True, exist_ok=True)
    result = method.run(case, out, context)
    record = {"wall_s": result.seconds, **result.details, "threads": context.threads,
              "device": context.device, "peak_rss_mb": peak_rss_mb()}
    if context.device.startswith("cuda"):
        import torch

        record["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["gpu"] = torch.cuda.get_device_name()

    from rwcflow.transforms import write_displacement_field

    displacement, grid = result.displacement()
    write_displacement_field(out / XFM, displacement, grid)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=Path, required=True, help="a case.json")
    parser.add_argument("--method", required=True, help="a method spec (benchmarks.methods)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", default="{}", help="JSON of benchmarks.methods.Context")
    args = parser.parse_args(argv)
    try:
        record = run(Case.load(args.case), args.method, args.out, Context.from_json(args.context))
    except Exception as exc:  # reported to the parent as this run's failure
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
