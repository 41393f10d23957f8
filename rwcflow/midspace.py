"""Rigid midspace of one participant's sessions: the unbiased starting point of a within-subject template.

Sessions of one participant show the same anatomy, moved in the scanner and changed a little. As in
FreeSurfer's ``mri_robust_template`` (Reuter et al., NeuroImage 2010), they are first brought together by
rigid transforms only, into the space half-way between them, so that no session is privileged and no
session is resampled more than another; the local change is left to the joint refinement
(:func:`rwcflow.groupwise.refine_groupwise`). Every session ``k`` is rigidly registered to session 1
(world matrix ``A_k``, session-1 world -> session-k world; ``A_1 = I``); the midspace is
``M = exp(mean_k log A_k)`` (the mean in the Lie algebra, for rigid matrices a rigid matrix again), and
the template -> session-k map is ``A_k M^-1``. The template grid is session 1's moved into the midspace
(affine ``M @ affine_1``): its voxels start on session 1's voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.linalg import expm, logm

from rwcflow.affine import affine_align
from rwcflow.io import Grid, Image


def mean_rigid(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """``exp(mean log A_k)`` of 4x4 rigid world matrices (the bi-invariant mean of small motions)."""
    logs = [np.real(logm(np.asarray(m, dtype=np.float64))) for m in matrices]
    return np.real(expm(np.mean(logs, axis=0)))


def rigid_midspace(sessions: Sequence[Image], *, align: bool = True,
                   device: str | torch.device = "cpu") -> tuple[Grid, list[np.ndarray]]:
    """The template grid and, per session, the template -> session world matrix (RAS mm, float64).

    ``align``: register the sessions rigidly (:func:`rwcflow.affine.affine_align`, ``rigid_only``); without
    it the sessions are taken as aligned in world space (every map the identity, the grid session 1's).
    """
    if not sessions:
        raise ValueError("a midspace needs at least one session")
    first = sessions[0]
    to_sessions = [np.eye(4)] + [affine_align(first, session, rigid_only=True, device=device) if align
                                 else np.eye(4) for session in sessions[1:]]
    middle = mean_rigid(to_sessions)
    to_middle = np.linalg.inv(middle)
    return Grid(first.grid.shape, middle @ first.affine), [matrix @ to_middle for matrix in to_sessions]
