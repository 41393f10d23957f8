"""rwcflow's tasks inside a user's own Pydra workflow (the README's example), submitted for real: its
outputs are those of the same tasks submitted one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fileformats.generic import File
from pydra.compose import workflow
from pydra.engine.submitter import Submitter

from rwcflow.example import make_example_pair
from rwcflow.io import load_image, save_image
from rwcflow.tasks import JacobianMaps, Register


@workflow.define(outputs=["warped", "log_jacobians"])
def ToTemplate(t1ws: list[File], template: File):
    """Every T1w registered to one template, with its log-Jacobian map."""
    registered = workflow.add(Register(fixed=template, model="none", io_iters=10, device="cpu")
                              .split(moving=t1ws).combine("moving"))
    jacobians = workflow.add(JacobianMaps().split(xfm=registered.xfm).combine("xfm"))
    return registered.warped, jacobians.log_jacobian


def test_tasks_compose_in_a_user_workflow(tmp_path, submit):
    pairs = [make_example_pair(resolution_mm=6.0, seed=seed) for seed in (1, 2)]
    template = save_image(pairs[0].fixed, tmp_path / "tpl-brain_T1w.nii.gz")
    t1ws = [save_image(pair.moving, tmp_path / f"sub-{n}_T1w.nii.gz") for n, pair in enumerate(pairs)]

    out = submit(ToTemplate(t1ws=t1ws, template=template))
    assert [Path(path).name for path in out.log_jacobians] == ["sub-0_T1w_xfm_log_jacobian.nii.gz",
                                                               "sub-1_T1w_xfm_log_jacobian.nii.gz"]
    # the same tasks one by one, in a cache of their own (so nothing is reused from the workflow's)
    with Submitter(worker="cf", cache_root=tmp_path / "alone") as alone:
        for t1w, warped, log_jacobian in zip(t1ws, out.warped, out.log_jacobians):
            registered = alone(Register(fixed=template, moving=t1w, model="none", io_iters=10, device="cpu")).outputs
            np.testing.assert_array_equal(load_image(warped).data, load_image(registered.warped).data)
            maps = alone(JacobianMaps(xfm=registered.xfm)).outputs
            np.testing.assert_array_equal(load_image(log_jacobian).data, load_image(maps.log_jacobian).data)
            assert load_image(warped).grid == load_image(template).grid
