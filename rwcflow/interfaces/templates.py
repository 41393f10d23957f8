"""Nipype interfaces for template construction: ANTs' shape update, the rigid midspace and the groupwise
refinement of a participant's sessions, and the single-session pass-through.
Thin wrappers over :mod:`rwcflow.steps`, writing into the node's working directory."""

from __future__ import annotations

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, OutputMultiObject, SimpleInterface,
                                    TraitedSpec, traits)

from rwcflow import steps
from rwcflow.groupwise import GroupwiseRefinement

from ._base import optional


class _ShapeUpdateInputSpec(BaseInterfaceInputSpec):
    average = File(exists=True, mandatory=True, desc="mean of the images registered to the current template")
    average_xfm = File(exists=True, mandatory=True, desc="mean of their template→subject fields")
    gradient_step = traits.Float(0.25, usedefault=True, desc="fraction of the mean field removed per step")
    repeats = traits.Int(4, usedefault=True, desc="steps per update (ANTs: 4)")
    log = File(exists=True, desc="the previous update's log (JSON)")


class _ShapeUpdateOutputSpec(TraitedSpec):
    template = File(exists=True, desc="the updated template, template_update-<n>.nii.gz")
    log = File(exists=True, desc="the log extended with this update's norms (JSON)")
    update_xfm = File(exists=True, desc="the update, an ITK field from the new template to the previous one, "
                                        "template_update-<n>_xfm.nii.gz")


class ShapeUpdate(SimpleInterface):
    """Template shape update of ANTs' ``antsMultivariateTemplateConstruction2.sh``
    (:func:`rwcflow.templates.shape_update`): ``average`` moved against ``-gradient_step`` times the
    mean field, ``repeats`` times; the log gets the mean field's length in mm."""

    input_spec = _ShapeUpdateInputSpec
    output_spec = _ShapeUpdateOutputSpec

    def _run_interface(self, runtime):
        template, log, update_xfm = steps.shape_update(self.inputs.average, self.inputs.average_xfm, runtime.cwd,
                                                       self.inputs.gradient_step, self.inputs.repeats,
                                                       optional(self.inputs.log))
        self._results.update(template=str(template), log=str(log), update_xfm=str(update_xfm))
        return runtime


class _RigidMidspaceInputSpec(BaseInterfaceInputSpec):
    sessions = InputMultiObject(File(exists=True), mandatory=True, desc="the participant's sessions")
    align = traits.Bool(True, usedefault=True,
                        desc="register the sessions rigidly (False: they are aligned in world space already)")
    device = traits.Str("auto", usedefault=True, desc='"auto", "cpu" or "cuda"')


class _RigidMidspaceOutputSpec(TraitedSpec):
    xfms = OutputMultiObject(File(exists=True),
                             desc="per session, its template→session map (ITK field on the template grid)")


class RigidMidspace(SimpleInterface):
    """The sessions' rigid midspace (:func:`rwcflow.midspace.rigid_midspace`): every session rigidly
    registered to the first, the template grid the first session's moved half-way between them (the mean
    motion), so that no session is privileged; per session its template→session map."""

    input_spec = _RigidMidspaceInputSpec
    output_spec = _RigidMidspaceOutputSpec

    def _run_interface(self, runtime):
        xfms = steps.rigid_midspace_files(self.inputs.sessions, runtime.cwd, align=self.inputs.align,
                                          device=self.inputs.device)
        self._results.update(xfms=[str(x) for x in xfms])
        return runtime


class _GroupwiseRefineInputSpec(BaseInterfaceInputSpec):
    sessions = InputMultiObject(File(exists=True), mandatory=True, desc="the participant's sessions")
    xfms = InputMultiObject(File(exists=True), mandatory=True,
                            desc="their template→session fields (ITK), in the same order, on the template's grid")
    iterations = traits.Int(GroupwiseRefinement.iterations, usedefault=True,
                            desc="L-BFGS iterations (0: the fields unchanged, the template re-averaged)")
    regularization = traits.Float(GroupwiseRefinement.regularization, usedefault=True,
                                  desc="weight of the diffusion term")
    device = traits.Str("auto", usedefault=True, desc='"auto", "cpu" or "cuda"')


class _GroupwiseRefineOutputSpec(TraitedSpec):
    template = File(exists=True, desc="the mean of the sessions resampled through the refined fields")
    xfms = OutputMultiObject(File(exists=True), desc="the refined template→session fields (ITK)")
    warped = OutputMultiObject(File(exists=True), desc="the sessions resampled onto the template")


class GroupwiseRefine(SimpleInterface):
    """The sessions' template→session fields refined jointly (:func:`rwcflow.groupwise.refine_groupwise`):
    every session resampled alike and compared with the others, so that sub-voxel changes are not biased."""

    input_spec = _GroupwiseRefineInputSpec
    output_spec = _GroupwiseRefineOutputSpec

    def _run_interface(self, runtime):
        template, xfms, warped = steps.groupwise_refine_files(
            self.inputs.sessions, self.inputs.xfms, runtime.cwd, iterations=self.inputs.iterations,
            regularization=self.inputs.regularization, device=self.inputs.device)
        self._results.update(template=str(template), xfms=[str(x) for x in xfms], warped=[str(w) for w in warped])
        return runtime


class _SingleSessionInputSpec(BaseInterfaceInputSpec):
    session = File(exists=True, mandatory=True, desc="the one session of a participant")


class _SingleSessionOutputSpec(TraitedSpec):
    template = File(exists=True, desc="the session itself, as its template")
    xfm = File(exists=True, desc="the identity (a zero displacement field on the session's grid)")
    warped = File(exists=True, desc="the session itself, as its image on the template")


class SingleSession(SimpleInterface):
    """Pass-through for a participant with one session: it is its own template, with an identity transform."""

    input_spec = _SingleSessionInputSpec
    output_spec = _SingleSessionOutputSpec

    def _run_interface(self, runtime):
        template, xfm, warped = steps.single_session(self.inputs.session, runtime.cwd)
        self._results.update(template=str(template), xfm=str(xfm), warped=str(warped))
        return runtime
