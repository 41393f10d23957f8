"""Nipype interfaces for registering a pair and for using its transforms: thin wrappers over
:mod:`rwcflow.steps`, writing into the node's working directory under the same names as the Pydra tasks."""

from __future__ import annotations

import torch
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from rwcflow import steps

from ._base import OutFileSpec, optional


class _RegisterInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True, desc="the fixed image (its grid is the output grid)")
    moving = File(exists=True, mandatory=True, desc="the image to register to the fixed one")
    model = traits.Str("default", usedefault=True, desc='RWCNet model: "default", "none" or a model file')
    io_iters = traits.Int(desc="instance-optimisation Adam steps per level (unset: the default; 0: off)")
    io_grid_factor = traits.Int(
        desc="fixed voxels per instance-optimisation control voxel (unset: 2 from zero, 1 after a network)")
    io_similarity = traits.Enum("mind", "ncc", "mse", desc="instance-optimisation similarity (unset: mind)")
    io_regularization = traits.Float(desc="instance-optimisation diffusion weight (unset: the similarity's)")
    io_interpolation = traits.Enum("linear", "bspline", desc="instance-optimisation sampling (unset: linear)")
    affine = traits.Bool(True, usedefault=True, desc="estimate an affine pre-alignment first")
    device = traits.Str("auto", usedefault=True, desc='"auto" (CUDA when the job has it), "cpu", "cuda"')
    fixed_labels = File(exists=True, desc="label map on the fixed grid (with moving_labels: metrics)")
    moving_labels = File(exists=True, desc="label map on the moving grid, warped with the image")
    fixed_mask = File(exists=True, desc="brain mask on the fixed grid")
    moving_mask = File(exists=True, desc="brain mask on the moving grid")
    num_threads = traits.Int(nohash=True, desc="torch threads of the job (unset: torch's choice)")


class _RegisterOutputSpec(TraitedSpec):
    warped = File(exists=True, desc="the moving image resampled onto the fixed grid")
    xfm = File(exists=True, desc="fixed→moving mapping, affine included: ITK displacement field (LPS mm)")
    affine = File(exists=True, desc="the affine pre-alignment: ITK text transform")
    warped_labels = File(desc="with moving_labels: the labels warped by nearest neighbour")
    metrics = File(desc="with both label maps: Dice, HD95, SDlogJ and folding (JSON)")


class Register(SimpleInterface):
    """Register ``moving`` to ``fixed`` (:func:`rwcflow.register.register`), outputs named after the
    moving image (``<moving>_warped.nii.gz``, ``<moving>_xfm.nii.gz``, ``<moving>_affine.txt``, ...).
    ``num_threads`` sets the job's torch threads; Nipype schedules the node on as many processors (its
    ``n_procs``, which also sets ``num_threads``).
    """

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        if isdefined(self.inputs.num_threads):
            torch.set_num_threads(self.inputs.num_threads)
        written = steps.register_files(
            self.inputs.fixed, self.inputs.moving, runtime.cwd, model=self.inputs.model,
            io_iters=optional(self.inputs.io_iters), io_grid_factor=optional(self.inputs.io_grid_factor),
            io_similarity=optional(self.inputs.io_similarity),
            io_regularization=optional(self.inputs.io_regularization),
            io_interpolation=optional(self.inputs.io_interpolation),
            affine=self.inputs.affine, device=self.inputs.device,
            fixed_labels=optional(self.inputs.fixed_labels), moving_labels=optional(self.inputs.moving_labels),
            fixed_mask=optional(self.inputs.fixed_mask), moving_mask=optional(self.inputs.moving_mask),
        )
        self._results.update({key: str(path) for key, path in written.items() if path is not None})
        return runtime


class _ApplyTransformInputSpec(BaseInterfaceInputSpec):
    image = File(exists=True, mandatory=True, desc="the image to resample (any grid, in moving space)")
    xfm = File(exists=True, mandatory=True, desc="ITK displacement field fixed→moving")
    reference = File(exists=True, desc="the output grid (default: the field's grid)")
    labels = traits.Bool(False, usedefault=True, desc="nearest-neighbour interpolation, for label maps")


class ApplyTransform(SimpleInterface):
    """Resample ``image`` through ``xfm`` onto ``reference``'s grid: ``<image>_resampled.nii.gz``
    (ANTs' ``antsApplyTransforms -i image -r reference -t xfm``)."""

    input_spec = _ApplyTransformInputSpec
    output_spec = OutFileSpec

    def _run_interface(self, runtime):
        self._results["out"] = str(steps.apply_transform(
            self.inputs.image, self.inputs.xfm, runtime.cwd, optional(self.inputs.reference), self.inputs.labels))
        return runtime


class _ComposeTransformsInputSpec(BaseInterfaceInputSpec):
    xfms = InputMultiObject(File(exists=True), mandatory=True,
                            desc="ITK displacement fields in ANTs order: the last acts first")
    reference = File(exists=True, desc="the output grid (default: the first field's grid)")


class ComposeTransforms(SimpleInterface):
    """One ITK displacement field for a chain of them, ``p -> A(B(p))`` for ``xfms=[A, B]`` (ANTs'
    ``-t A -t B``), named after the first: ``<A>_composed.nii.gz``."""

    input_spec = _ComposeTransformsInputSpec
    output_spec = OutFileSpec

    def _run_interface(self, runtime):
        self._results["out"] = str(steps.compose_transforms(
            self.inputs.xfms, runtime.cwd, optional(self.inputs.reference),
            name=steps.output_name(self.inputs.xfms[0], "composed")))
        return runtime


class _InvertTransformInputSpec(BaseInterfaceInputSpec):
    xfm = File(exists=True, mandatory=True, desc="ITK displacement field")


class InvertTransform(SimpleInterface):
    """The inverse of an ITK displacement field, on its grid: ``<xfm>_inverse.nii.gz``."""

    input_spec = _InvertTransformInputSpec
    output_spec = OutFileSpec

    def _run_interface(self, runtime):
        self._results["out"] = str(steps.invert_transform(self.inputs.xfm, runtime.cwd))
        return runtime
