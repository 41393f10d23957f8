"""ANTs registration through antspyx, run by the interpreter of antspyx's own environment.

    $RWCFLOW_ANTS_PYTHON benchmarks/ants_syn.py FIXED MOVING OUT_DIR [--options JSON]

``--options`` are keyword arguments of ``ants.registration`` (default: ``type_of_transform="SyN"``,
antspyx's default: affine then SyN, Mattes mutual information). Writes ``OUT_DIR/ants_xfm.nii.gz``,
the whole fixed→moving mapping (affine and warp composed by antsApplyTransforms) as an ITK
displacement field on the fixed grid, and prints ``{"seconds": ...}`` (the registration alone) as
its last line. Threads: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; seed: ``ANTS_RANDOM_SEED``.
This file imports nothing from rwcflow: antspyx's environment need not have it.
"""

import argparse
import json
import os
import time
from pathlib import Path

import ants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--options", default="{}", help="JSON keyword arguments of ants.registration")
    args = parser.parse_args()
    options = {"type_of_transform": "SyN", **json.loads(args.options)}
    fixed, moving = ants.image_read(args.fixed), ants.image_read(args.moving)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(args.out_dir / "ants_")
    start = time.perf_counter()
    result = ants.registration(fixed, moving, outprefix=prefix, **options)
    seconds = time.perf_counter() - start
    composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=prefix)
    os.replace(composed, args.out_dir / "ants_xfm.nii.gz")
    print(json.dumps({"seconds": seconds, "transforms": [Path(t).name for t in result["fwdtransforms"]]}))


if __name__ == "__main__":
    main()
