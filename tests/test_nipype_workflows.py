"""rwcflow's Nipype workflows embedded in larger Nipype workflows with Nipype's own nodes (IdentityInterface,
Function, Merge, DataSink), run for real with the MultiProc plugin (2 processes): a known translation is
recovered and its inverse composes to the identity; a simulated local atrophy gives a negative log-Jacobian
change, and the longitudinal workflow (rigid midspace, then joint refinement) gives the same files as its
Pydra twin, with the same defaults."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check of Nipype's latest version

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import io as nio
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from rwcflow import spatial, transforms
from rwcflow.bids_app.demo import shrink_sphere
from rwcflow.example import make_example_pair
from rwcflow.interfaces import (ApplyTransform, ComposeTransforms, InvertTransform, init_longitudinal_wf,
                                init_pairwise_wf)
from rwcflow.io import load_image, save_image
from rwcflow.workflows.longitudinal import Longitudinal

SHIFT_MM = np.array([4.0, -3.0, 2.5])
SPHERE_CENTRE_MM, SPHERE_RADIUS_MM, VOLUME_LOSS = np.array([0.0, -10.0, 10.0]), 18.0, 0.3


def _run(workflow: pe.Workflow, tmp_path: Path) -> None:
    """Run ``workflow`` under ``tmp_path`` with MultiProc on 2 processes, polling fast, failing loudly.

    MultiProc calls ``gc.collect()`` before submitting jobs, which takes ~0.3 s in a process holding
    pytest, torch and nilearn: the objects that exist already are frozen out of the collector's way.
    """
    workflow.base_dir = str(tmp_path / "work")
    workflow.config["execution"] = {"poll_sleep_duration": 0.1, "crashdump_dir": str(tmp_path / "crash"),
                                    "stop_on_first_crash": True}
    gc.freeze()
    try:
        workflow.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    finally:
        gc.unfreeze()


def _sink(out_dir: Path) -> pe.Node:
    return pe.Node(nio.DataSink(base_directory=str(out_dir), parameterization=False), name="sink")


def shift_image(in_file, shift_mm):
    """``in_file`` moved by ``shift_mm`` in world space through its header (a rigid repositioning), so the
    fixed→moving mapping is ``p -> p + t`` (a Function node: Nipype runs it from its source)."""
    from pathlib import Path

    from rwcflow.io import Image, load_image, save_image

    image = load_image(in_file)
    affine = image.affine.copy()
    affine[:3, 3] += shift_mm
    return str(save_image(Image(image.data, affine), Path.cwd() / "moving_T1w.nii.gz"))


def log_change(log_jacobians):
    """The log volume change from the first session to the second, in template space (a Function node)."""
    from pathlib import Path

    from rwcflow.io import load_image, save_image

    first, second = (load_image(path) for path in log_jacobians)
    return str(save_image(second.with_data(second.data - first.data), Path.cwd() / "log_change.nii.gz"))


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    image = make_example_pair(resolution_mm=6.0).fixed
    return image, save_image(image, tmp_path_factory.mktemp("brain") / "fixed_T1w.nii.gz")


def test_pairwise_workflow_recovers_a_translation_and_its_inverse(brain, tmp_path):
    image, fixed = brain
    inputnode = pe.Node(niu.IdentityInterface(fields=["fixed", "shift_mm"]), name="inputnode")
    inputnode.inputs.fixed, inputnode.inputs.shift_mm = str(fixed), SHIFT_MM.tolist()
    shift = pe.Node(niu.Function(function=shift_image, input_names=["in_file", "shift_mm"],
                                 output_names=["out_file"]), name="shift")
    pairwise = init_pairwise_wf(model="none", io_iters=50, device="cpu")
    invert = pe.Node(InvertTransform(), name="invert")
    chain = pe.Node(niu.Merge(2), name="chain")
    round_trip = pe.Node(ComposeTransforms(), name="round_trip")
    resample = pe.Node(ApplyTransform(), name="resample")
    sink = _sink(tmp_path / "out")
    workflow = pe.Workflow(name="translation")
    workflow.connect([
        (inputnode, shift, [("fixed", "in_file"), ("shift_mm", "shift_mm")]),
        (inputnode, pairwise, [("fixed", "inputnode.fixed")]),
        (shift, pairwise, [("out_file", "inputnode.moving")]),
        (pairwise, invert, [("outputnode.xfm", "xfm")]),
        (invert, chain, [("out", "in1")]),  # ANTs order: the field acts first, then its inverse
        (pairwise, chain, [("outputnode.xfm", "in2")]),
        (chain, round_trip, [("out", "xfms")]),
        (shift, resample, [("out_file", "image")]),
        (inputnode, resample, [("fixed", "reference")]),
        (pairwise, resample, [("outputnode.xfm", "xfm")]),
        (pairwise, sink, [("outputnode.xfm", "@xfm"), ("outputnode.warped", "@warped"),
                          ("outputnode.log_jacobian", "@log_jacobian")]),
        (invert, sink, [("out", "@inverse")]),
        (round_trip, sink, [("out", "@round_trip")]),
        (resample, sink, [("out", "@resampled")]),
    ])
    _run(workflow, tmp_path)

    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "moving_T1w_resampled.nii.gz", "moving_T1w_warped.nii.gz", "moving_T1w_xfm.nii.gz",
        "moving_T1w_xfm_inverse.nii.gz", "moving_T1w_xfm_inverse_composed.nii.gz", "moving_T1w_xfm_log_jacobian.nii.gz"]
    inside = image.data > 0.1 * image.data.max()
    disp, grid = transforms.read_displacement_field(out / "moving_T1w_xfm.nii.gz")
    assert grid == image.grid
    error = np.linalg.norm(disp[inside] - SHIFT_MM, axis=-1)  # the known translation, recovered
    assert np.median(error) < 0.75 and np.percentile(error, 90) < 1.25  # mm, on 6 mm voxels
    assert np.abs(load_image(out / "moving_T1w_xfm_log_jacobian.nii.gz").data[inside]).mean() < 0.05

    # the warped image is the fixed one again, and ApplyTransform through the written field gives it too
    warped = load_image(out / "moving_T1w_warped.nii.gz").data
    assert np.corrcoef(warped[inside], image.data[inside])[0, 1] > 0.99
    resampled = load_image(out / "moving_T1w_resampled.nii.gz").data
    assert np.abs(resampled - warped)[inside].max() < 1e-3 * image.data.max()

    # the inverse after the field is the identity
    residual = transforms.read_displacement_field(out / "moving_T1w_xfm_inverse_composed.nii.gz")[0]
    assert np.linalg.norm(residual[inside], axis=-1).max() < 0.1 * np.linalg.norm(SHIFT_MM)
    inverse = transforms.read_displacement_field(out / "moving_T1w_xfm_inverse.nii.gz")[0]
    assert np.median(np.linalg.norm(inverse[inside] + SHIFT_MM, axis=-1)) < 0.5


@pytest.fixture(scope="module")
def sessions(brain, tmp_path_factory):
    """Two sessions of the brain, the second with a sphere shrunk by VOLUME_LOSS (demo data's atrophy)."""
    image, first = brain
    field = shrink_sphere(image.grid, SPHERE_CENTRE_MM, SPHERE_RADIUS_MM, VOLUME_LOSS)
    shrunk = spatial.warp(image.tensor(), field)[0, 0].numpy()
    folder = tmp_path_factory.mktemp("sub-01")
    return [str(save_image(image, folder / "ses-1_T1w.nii.gz")),
            str(save_image(image.with_data(shrunk), folder / "ses-2_T1w.nii.gz"))]


def test_longitudinal_workflow_finds_the_atrophy_and_matches_the_pydra_workflow(brain, sessions, tmp_path, submit):
    image, _ = brain
    options = dict(refine_iters=20, affine=False, device="cpu")  # few refinement steps: a fast test
    inputnode = pe.Node(niu.IdentityInterface(fields=["sessions"]), name="inputnode")
    inputnode.inputs.sessions = sessions
    longitudinal = init_longitudinal_wf(len(sessions), **options)
    change = pe.Node(niu.Function(function=log_change, input_names=["log_jacobians"], output_names=["out_file"]),
                     name="change")
    sink = _sink(tmp_path / "out")
    workflow = pe.Workflow(name="participant")
    workflow.connect([
        (inputnode, longitudinal, [("sessions", "inputnode.sessions")]),
        (longitudinal, change, [("outputnode.log_jacobians", "log_jacobians")]),
        (change, sink, [("out_file", "@change")]),
        (longitudinal, sink, [("outputnode.template", "@template")] + [
            (f"outputnode.{output}", f"{output}.@files")
            for output in ("xfms", "inverse_xfms", "warped", "jacobians", "log_jacobians")]),
    ])
    _run(workflow, tmp_path)

    out = tmp_path / "out"
    assert sorted(path.name for path in (out / "xfms").iterdir()) == ["ses-1_T1w_xfm.nii.gz", "ses-2_T1w_xfm.nii.gz"]
    assert sorted(path.name for path in (out / "inverse_xfms").iterdir()) == [
        "ses-1_T1w_xfm_inverse.nii.gz", "ses-2_T1w_xfm_inverse.nii.gz"]
    template = load_image(out / "template.nii.gz")  # the mean of the jointly refined sessions
    assert template.grid == image.grid  # session 1's grid: without alignment the midspace is the identity

    # the second session lost volume in the sphere, not far from it
    log_change_map = load_image(out / "log_change.nii.gz").data
    distance = np.linalg.norm(image.grid.world_points() - SPHERE_CENTRE_MM, axis=-1)
    expected = np.log(1.0 - VOLUME_LOSS)
    sphere = distance <= SPHERE_RADIUS_MM
    far = (distance >= 3 * SPHERE_RADIUS_MM) & (image.data > 0.1 * image.data.max())
    assert expected < log_change_map[sphere].mean() < 0.25 * expected  # ~50 % of it in 20 steps on 6 mm voxels
    assert abs(log_change_map[far].mean()) < 0.3 * abs(expected)

    # the Pydra workflow of the same algorithm writes the same files
    pydra = submit(Longitudinal(sessions=sessions, **options))
    np.testing.assert_allclose(template.data, load_image(pydra.template).data, atol=1e-5)
    for folder, files in (("xfms", pydra.xfms), ("inverse_xfms", pydra.inverse_xfms)):
        for path in files:
            np.testing.assert_allclose(transforms.read_displacement_field(out / folder / Path(path).name)[0],
                                       transforms.read_displacement_field(path)[0], atol=1e-5)
    for folder, files in (("warped", pydra.warped), ("log_jacobians", pydra.log_jacobians)):
        for path in files:
            np.testing.assert_allclose(load_image(out / folder / Path(path).name).data, load_image(path).data,
                                       atol=1e-5)


def test_single_session_passes_through(sessions, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="rwcflow"):
        longitudinal = init_longitudinal_wf(1, device="cpu")
    assert "a single session" in caplog.text
    longitudinal.inputs.inputnode.sessions = sessions[:1]
    workflow = pe.Workflow(name="single")
    workflow.connect([(longitudinal, _sink(tmp_path / "out"), [("outputnode.log_jacobians", "@log_jacobians"),
                                                               ("outputnode.xfms", "@xfms")])])
    _run(workflow, tmp_path)
    out = tmp_path / "out"
    assert not transforms.read_displacement_field(out / "ses-1_T1w_xfm.nii.gz")[0].any()
    assert not np.asanyarray(nib.load(out / "ses-1_T1w_xfm_log_jacobian.nii.gz").dataobj).any()
    with pytest.raises(ValueError, match="at least one session"):
        init_longitudinal_wf(0)
    with pytest.raises(ValueError, match="refine_iters must be"):
        init_longitudinal_wf(2, refine_iters=-1)


def test_longitudinal_workflow_has_the_defaults_of_the_pydra_workflow():
    """The same defaults as :class:`Longitudinal`; the joint refinement always runs (0 steps: re-averaged)."""
    pydra = Longitudinal(sessions=[])
    workflow = init_longitudinal_wf(2)
    midspace, refine = workflow.get_node("midspace"), workflow.get_node("refine")
    assert (refine.inputs.iterations, midspace.inputs.align, midspace.inputs.device, refine.inputs.device) == (
        pydra.refine_iters, pydra.affine, pydra.device, pydra.device)
    workflow = init_longitudinal_wf(3, refine_iters=0, affine=False, device="cpu")
    assert workflow.get_node("refine").inputs.iterations == 0
    assert workflow.get_node("midspace").inputs.align is False
