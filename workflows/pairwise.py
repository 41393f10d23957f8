"""Pairwise registration workflow: one fixed/moving pair, its transforms, warped images and Jacobian maps."""

from __future__ import annotations

from fileformats.generic import File
from pydra.compose import workflow

from rwcflow.tasks import JacobianMaps, Register


@workflow.define(outputs={"warped": File, "xfm": File, "affine": File, "warped_labels": File | None,
                          "metrics": File | None, "jacobian": File, "log_jacobian": File})
def Pairwise(fixed: File, moving: File, model: str = "default", io_iters: int | None = None,
             affine: bool = True, device: str = "auto",
             fixed_labels: File | None = None, moving_labels: File | None = None,
             fixed_mask: File | None = None, moving_mask: File | None = None):
    """Register ``moving`` to ``fixed`` and map the volume change of the result.

    Inputs: ``fixed``, ``moving`` (NIfTI/MGZ images, any grids); ``model`` (``"default"``, ``"none"`` or
    a model file), ``io_iters`` (instance-optimisation iterations; ``None``: the default, 0: off),
    ``affine`` (estimate an affine pre-alignment), ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``);
    optional label maps (``fixed_labels``, ``moving_labels``) and masks (``fixed_mask``, ``moving_mask``).

    Outputs: ``warped`` (moving on the fixed grid), ``xfm`` (ITK displacement field fixed→moving,
    affine included), ``affine`` (ITK text transform), ``warped_labels`` and ``metrics`` (JSON: Dice,
    HD95, SDlogJ, folding) when label maps are given, else ``None``; ``jacobian`` and ``log_jacobian``
    (determinant of the Jacobian of ``xfm``'s whole mapping on the fixed grid, and its logarithm).
    """
    registration = workflow.add(Register(
        fixed=fixed, moving=moving, model=model, io_iters=io_iters, affine=affine, device=device,
        fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_mask=fixed_mask, moving_mask=moving_mask,
    ), name="register")
    maps = workflow.add(JacobianMaps(xfm=registration.xfm), name="jacobian")
    return (registration.warped, registration.xfm, registration.affine, registration.warped_labels,
            registration.metrics, maps.jacobian, maps.log_jacobian)
