"""Nipype interfaces for voxel-wise maps: Jacobian maps of a transform, averages of images and of
transforms. Thin wrappers over :mod:`rwcflow.steps`, writing into the node's working directory."""

from __future__ import annotations

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface, TraitedSpec,
                                    traits)

from rwcflow import steps

from ._base import OutFileSpec


class _JacobianMapsInputSpec(BaseInterfaceInputSpec):
    xfm = File(exists=True, mandatory=True, desc="ITK displacement field")


class _JacobianMapsOutputSpec(TraitedSpec):
    jacobian = File(exists=True, desc="Jacobian determinant of the field's mapping (> 1: expansion)")
    log_jacobian = File(exists=True, desc="its logarithm (folded voxels floored)")


class JacobianMaps(SimpleInterface):
    """Jacobian determinant of an ITK displacement field's mapping in world mm, and its logarithm:
    ``<xfm>_jacobian.nii.gz``, ``<xfm>_log_jacobian.nii.gz`` (tensor-based morphometry)."""

    input_spec = _JacobianMapsInputSpec
    output_spec = _JacobianMapsOutputSpec

    def _run_interface(self, runtime):
        jacobian, log_jacobian = steps.jacobian_maps(self.inputs.xfm, runtime.cwd)
        self._results.update(jacobian=str(jacobian), log_jacobian=str(log_jacobian))
        return runtime


class _AverageImagesInputSpec(BaseInterfaceInputSpec):
    images = InputMultiObject(File(exists=True), mandatory=True,
                              desc="images (others than the first resampled onto its grid in world space)")
    method = traits.Enum("mean", "median", usedefault=True, desc="voxel-wise mean or median")
    sharpen = traits.Float(0.0, usedefault=True, desc="Laplacian sharpening strength (0: none)")


class _AverageImagesOutputSpec(TraitedSpec):
    average = File(exists=True, desc="the average on the first image's grid")


class AverageImages(SimpleInterface):
    """Voxel-wise mean or median of images, optionally Laplacian-sharpened: ``average.nii.gz``."""

    input_spec = _AverageImagesInputSpec
    output_spec = _AverageImagesOutputSpec

    def _run_interface(self, runtime):
        self._results["average"] = str(steps.average_images(
            self.inputs.images, runtime.cwd, self.inputs.method, self.inputs.sharpen))
        return runtime


class _AverageFieldsInputSpec(BaseInterfaceInputSpec):
    xfms = InputMultiObject(File(exists=True), mandatory=True, desc="ITK displacement fields")


class AverageFields(SimpleInterface):
    """Voxel-wise mean of ITK displacement fields on the first one's grid: ``average_xfm.nii.gz``."""

    input_spec = _AverageFieldsInputSpec
    output_spec = OutFileSpec

    def _run_interface(self, runtime):
        self._results["out"] = str(steps.average_transforms(self.inputs.xfms, runtime.cwd))
        return runtime
