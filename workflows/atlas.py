"""Unbiased template (atlas) construction, as ANTs' ``antsMultivariateTemplateConstruction2.sh`` does it.

Start from the average of the images affinely aligned to the first (or from a given template); then,
``iterations`` times: register every image to the template, average the warped images (optionally
sharpened) and the template→subject fields, and move the average against the mean field
(:class:`rwcflow.tasks.ShapeUpdate`). rwcflow's fields map template points to subject points, so their
mean displacement is the template's shape bias, and the update pulls the average image back through
``-gradient_step`` times it. The last round's registrations are then carried through the last update
(:class:`rwcflow.tasks.FollowUpdate`: the update's field, then each registration's), which gives every
image's map from the final template without registering every image once more, as ANTs' script does.
"""

from __future__ import annotations

from fileformats.generic import File
from pydra.compose import workflow

from rwcflow.tasks import AverageFields, AverageImages, FollowUpdate, LabelProbabilities, Register, ShapeUpdate


def _register_all(template, images: list[File], labels: list[File] | None, name: str, **options):
    """``images`` (and their ``labels``) registered to ``template``: one job per image, outputs as lists."""
    task = Register(fixed=template, **options)
    if labels is None:
        task = task.split(moving=images)
    else:
        task = task.split(("moving", "moving_labels"), moving=images, moving_labels=labels)
    return workflow.add(task.combine("moving"), name=name)


@workflow.define(outputs={"template": File, "xfms": list[File], "warped": list[File], "log": File,
                          "templates": list[File], "label_probabilities": File | None,
                          "label_values": list[int] | None})
def Atlas(images: list[File], iterations: int = 3, gradient_step: float = 0.25, shape_repeats: int = 4,
          sharpen: float = 0.0, model: str = "default", io_iters: int | None = None,
          io_grid_factor: int | None = None, io_similarity: str | None = None,
          io_regularization: float | None = None, io_interpolation: str | None = None, affine: bool = True,
          device: str = "auto", labels: list[File] | None = None, initial_template: File | None = None):
    """Build an unbiased template from ``images``.

    Inputs: ``images`` (two or more NIfTI/MGZ images); ``iterations`` (template updates, fixed when the
    workflow is built); ``gradient_step`` (fraction of the mean field removed per update step) applied
    ``shape_repeats`` times (ANTs: 4); ``sharpen``, the Laplacian sharpening of each average
    (:func:`rwcflow.maps.laplacian_sharpen`; 0: none, ANTs sharpens by default); ``model``,
    ``io_iters``, ``io_grid_factor``, ``io_similarity``, ``io_regularization``, ``io_interpolation``,
    ``affine``, ``device`` (as for :class:`rwcflow.tasks.Register`);
    ``labels`` (one label map per image, same grids) for label probability maps; ``initial_template``
    (default: the mean of the images on the first one's grid, affinely aligned to it when ``affine``).

    Outputs: ``template`` (on the initial template's grid); ``xfms`` (each image's ITK displacement
    field template→image, affine included) and ``warped`` (each image on the template), the last round's
    registrations carried through the last update; ``log`` (JSON, one entry per update with ``update_norm_mm``,
    the mean length in mm of the average template→subject field over the template's foreground);
    ``templates``, the template of each iteration (the initial one first; ``template`` follows the
    last); with ``labels``,
    ``label_probabilities`` (4-D, the fraction of subjects with label ``label_values[n]`` in volume
    ``n``) and ``label_values``, else ``None``.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if len(images) < 2:
        raise ValueError(f"a template needs two or more images, got {len(images)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} label maps for {len(images)} images")
    options = dict(model=model, io_iters=io_iters, io_grid_factor=io_grid_factor, io_similarity=io_similarity,
                   io_regularization=io_regularization, io_interpolation=io_interpolation, affine=affine,
                   device=device)
    template = initial_template
    if template is None:
        starts = images
        if affine:
            starts = _register_all(images[0], images, None, "affine_to_first", model="none", io_iters=0,
                                   device=device).warped
        template = workflow.add(AverageImages(images=starts), name="initial_average").average
    log = templates = None
    for k in range(iterations):
        registered = _register_all(template, images, None, f"register_{k}", **options)
        average = workflow.add(AverageImages(images=registered.warped, sharpen=sharpen), name=f"average_{k}")
        field = workflow.add(AverageFields(xfms=registered.xfm), name=f"average_field_{k}")
        update = workflow.add(ShapeUpdate(average=average.average, average_xfm=field.out, gradient_step=gradient_step,
                                          repeats=shape_repeats, log=log, template=template, templates=templates),
                              name=f"shape_update_{k}")
        template, log, templates = update.template, update.log, update.templates
    follow = FollowUpdate(update_xfm=update.update_xfm)
    if labels is None:
        follow = follow.split(("moving", "xfm"), moving=images, xfm=registered.xfm)
    else:
        follow = follow.split(("moving", "xfm", "moving_labels"), moving=images, xfm=registered.xfm,
                              moving_labels=labels)
    final = workflow.add(follow.combine("moving"), name="follow_update")
    probabilities = values = None
    if labels is not None:
        maps = workflow.add(LabelProbabilities(label_maps=final.warped_labels), name="label_probabilities")
        probabilities, values = maps.probabilities, maps.label_values
    return template, final.xfm, final.warped, log, templates, probabilities, values
