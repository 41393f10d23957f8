"""Nipype interfaces over the rwcflow engine, and Nipype workflows built from them.

Each interface is a thin wrapper over one step of :mod:`rwcflow.steps` (the same the Pydra tasks of
:mod:`rwcflow.tasks` run): it reads its input files, writes its outputs into the node's working
directory, named after the input image as the Pydra tasks name them, and reports their paths. Use them
as any Nipype interface, ``pe.Node(Register(model="none"), name="register")``, or through the workflows
:func:`init_pairwise_wf` and :func:`init_longitudinal_wf`.
"""

from .maps import AverageFields, AverageImages, JacobianMaps
from .registration import ApplyTransform, ComposeTransforms, InvertTransform, Register
from .templates import GroupwiseRefine, RigidMidspace, ShapeUpdate, SingleSession
from .workflows import init_longitudinal_wf, init_pairwise_wf

__all__ = [
    "ApplyTransform", "AverageFields", "AverageImages", "ComposeTransforms", "GroupwiseRefine", "InvertTransform",
    "JacobianMaps", "Register", "RigidMidspace", "ShapeUpdate", "SingleSession", "init_longitudinal_wf",
    "init_pairwise_wf",
]
