"""HTML reports of the BIDS App, as fMRIPrep writes them: one per participant (``sub-<label>.html``) and
one for the group (``group.html``) at the top of the derivatives folder, their figures in
``sub-<label>/figures/`` and ``figures/``. Every link is relative, so the folder can be moved; every
file is written atomically.

Figures are nilearn drawings (PNG) on matplotlib figures made without pyplot, so no backend is switched
and nothing is left open. A figure whose input cannot be read is replaced by a message in the report's
error box; the rest of the report is still written.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.figure import Figure
from nilearn import plotting

import rwcflow
from rwcflow.errors import RwcflowError
from rwcflow.io import Image, atomic_write, load_image, read_nibabel, resample

DPI = 80
ORTHO_SIZE = (7.5, 2.6)
THUMBNAIL_SIZE = (5.0, 1.75)
CONTOUR_COLOURS = ("#ff3b3b", "#ffd700")
"""Colours of the brain outline and of the grey/white-matter boundary drawn from a template."""
NO_CHANGE = 1e-4
"""A log-Jacobian map whose magnitude stays under this in the brain (0.01 % volume change) is not drawn."""


@dataclass
class SessionResult:
    """One session of a participant, as the report shows it (paths are files already written)."""

    session: str | None          # "1", or None for a dataset without sessions
    t1w: Path                    # the raw input T1w (native space)
    registered: Path             # the session resampled into the within-subject template space
    jacobian: Path | None        # Jacobian determinant map in template space (None for a single session)
    log_jacobian: Path | None
    metrics: dict                # e.g. {"mean_abs_log_jacobian": ..., "correlation_to_template": ...}; may be empty


@dataclass
class ParticipantResult:
    """What the participant report shows; ``template`` is None when the participant failed early."""

    participant: str             # label without "sub-"
    template: Path | None        # within-subject template (or the single session)
    sessions: list[SessionResult]
    group_template: Path | None = None      # the group/standard template registered to, if any
    group_registered: Path | None = None    # the within-subject template resampled into group space
    parameters: dict = field(default_factory=dict)   # options shown in the report
    errors: list[str] = field(default_factory=list)  # messages shown in a red box


@dataclass
class GroupResult:
    """What the group report shows."""

    template: Path                       # the group template
    iteration_templates: list[Path]      # template of each iteration (initial first)
    convergence: list[dict]              # the atlas log: [{"update": 1, "update_norm_mm": ...}, ...]
    participants: dict[str, Path]        # participant label -> its image registered onto the group template
    fit: dict[str, float]                # participant label -> correlation with the template (or similar)
    parameters: dict = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # participant label -> error message


REFERENCES = [
    "Sivan V, Vujovic T, Ranabhat R, Wong A, McLachlin S, Hardisty M. Recurrence With Correlation Network for "
    "Medical Image Registration. arXiv:2302.02283, 2023 (MICCAI Learn2Reg 2022 challenge).",
    "Teed Z, Deng J. RAFT: Recurrent All-Pairs Field Transforms for Optical Flow. ECCV 2020.",
    "Heinrich MP, Jenkinson M, Papiez BW, Brady M, Schnabel JA. Towards realtime multimodal fusion for "
    "image-guided interventions using self-similarities. MICCAI 2013, LNCS 8149:187-194.",
    "Siebert H, Hansen L, Heinrich MP. Fast 3D registration with accurate optimisation and little learning "
    "for Learn2Reg 2021. MICCAI 2021 challenges, LNCS 13166:174-179, 2022.",
    "Avants BB, Yushkevich P, Pluta J, Minkoff D, Korczykowski M, Detre J, Gee JC. The optimal template "
    "effect in hippocampus studies of diseased populations. NeuroImage 49(3):2457-2466, 2010.",
    "Gorgolewski KJ et al. The brain imaging data structure, a format for organizing and describing outputs "
    "of neuroimaging experiments. Scientific Data 3:160044, 2016.",
    "Gorgolewski KJ et al. BIDS apps: Improving ease of use, accessibility, and reproducibility of "
    "neuroimaging data analysis methods. PLoS Computational Biology 13(3):e1005209, 2017.",
    "Jarecka D et al. Pydra - a flexible and lightweight dataflow engine for scientific analyses. "
    "Proceedings of the 19th Python in Science Conference (SciPy 2020).",
]


def rwcflow_version() -> str:
    """rwcflow's version: the package attribute, else the installed distribution's, else "unknown"."""
    version = getattr(rwcflow, "__version__", None)
    if version:
        return version
    try:
        return importlib.metadata.version("rwcflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def citation_text() -> str:
    """The methods boilerplate (Markdown) for manuscripts, with its references."""
    references = "\n".join(f"{n}. {reference}" for n, reference in enumerate(REFERENCES, start=1))
    return f"""# Methods boilerplate

Structural images were processed with rwcflow {rwcflow_version()}, a BIDS App (Gorgolewski et al., 2016,
2017) for learned deformable registration of brain MRI built on Pydra (Jarecka et al., 2020). rwcflow
registers images with the Recurrence With Correlation Network (RWCNet; Sivan et al., 2023), a coarse-to-fine
network that refines a displacement field recurrently from local correlation cost volumes, after the manner
of RAFT (Teed and Deng, 2020), and refines the field by instance optimisation (Adam on a MIND-SSC similarity
with a diffusion regulariser on the correction, as in ConvexAdam; Heinrich et al., 2013; Siebert et al.,
2022). The options of this run are listed in the reports and in the derivatives' JSON sidecars (key `rwcflow`).

For each participant with several sessions, an unbiased within-subject template was built by iterative
groupwise registration of all sessions (register every session to the current template, average, remove
the mean shape; as in ANTs' template construction, Avants et al., 2010), so that no session is privileged.
Each session was resampled into the template in one interpolation, and the Jacobian determinant of its
transform and its logarithm were computed in template space for tensor-based morphometry. A group template,
when built, was made in the same way from the participants' within-subject templates.

This text was generated by rwcflow; we release it under the CC0 licence so that it can be copied into
manuscripts unchanged. Please cite the references below.

## References

{references}
"""


def participant_report(output_dir: Path, result: ParticipantResult) -> Path:
    """Write ``output_dir/sub-<label>.html`` and its figures in ``output_dir/sub-<label>/figures/``."""
    output_dir = Path(output_dir)
    sub = f"sub-{result.participant}"
    figures = _Figures(output_dir / sub / "figures")
    template = None if result.template is None else figures.load(result.template, "within-subject template")
    cuts = None if template is None else _centre(template)
    template_figure = None if template is None else figures.draw(
        f"{sub}_desc-template_T1w.png", lambda path: _anatomy(template, path, cuts=cuts))
    sessions = [_session_view(figures, sub, session, template, cuts) for session in result.sessions]

    group = None
    if result.group_template is not None and result.group_registered is not None:
        group_template = figures.load(result.group_template, "group template")
        moved = figures.load(result.group_registered, "template in group space")
        if group_template is not None and moved is not None:
            group = figures.draw(f"{sub}_space-group_T1w.png", lambda path: _anatomy(
                moved, path, contours=group_template, cuts=_centre(group_template)))

    metric_names = list(dict.fromkeys(name for session in result.sessions for name in session.metrics))
    return _render(output_dir, f"{sub}.html", "participant.html", {
        "title": sub, "result": result, "template_figure": template_figure, "sessions": sessions,
        "group_figure": group, "metric_names": metric_names, "errors": [*result.errors, *figures.problems],
    })


def _session_view(figures: _Figures, sub: str, session: SessionResult, template: Image | None, cuts) -> dict:
    """A session's section of the participant report: the session, its figures (None if not drawn) and
    whether its log-Jacobian map is flat (no change anywhere in the brain)."""
    prefix = sub if session.session is None else f"{sub}_ses-{session.session}"
    view = {"id": prefix, "title": "Session" if session.session is None else f"Session {session.session}",
            "result": session, "before": None, "after": None, "change": None, "flat": False}
    if template is None:
        return view
    registered = figures.load(session.registered, "registered session")
    raw = figures.load(session.t1w, "session")
    if registered is not None and raw is not None:
        scale = _intensity_range(registered)
        view["before"] = figures.draw(f"{prefix}_desc-before_T1w.png", lambda path: _anatomy(
            resample(raw, template.grid), path, contours=template, cuts=cuts, scale=scale))
        view["after"] = figures.draw(f"{prefix}_desc-after_T1w.png", lambda path: _anatomy(
            registered, path, contours=template, cuts=cuts, scale=scale))
    change = None if session.log_jacobian is None else figures.load(session.log_jacobian, "log-Jacobian map", maps=True)
    if change is not None:
        change = _change_in_brain(change, template)
        view["flat"] = float(np.abs(change.data).max()) < NO_CHANGE
        if not view["flat"]:
            view["change"] = figures.draw(f"{prefix}_desc-logjacobian_map.png",
                                          lambda path: _log_jacobian(change, template, path))
    return view


def group_report(output_dir: Path, result: GroupResult) -> Path:
    """Write ``output_dir/group.html`` and its figures in ``output_dir/figures/``."""
    output_dir = Path(output_dir)
    figures = _Figures(output_dir / "figures")
    template = figures.load(result.template, "group template")
    cuts = None if template is None else _centre(template)
    template_figure = None if template is None else figures.draw(
        "desc-template_T1w.png", lambda path: _anatomy(template, path, cuts=cuts))

    loaded = (figures.load(path, "iteration template") for path in result.iteration_templates)
    iterations = [image for image in loaded if image is not None]
    montage = figures.draw("desc-iterations_T1w.png", lambda path: _montage(iterations, path, cuts)) \
        if iterations and cuts is not None else None
    updates = [entry for entry in result.convergence if "update_norm_mm" in entry]
    convergence = figures.draw("desc-convergence_plot.png", lambda path: _convergence(updates, path)) \
        if updates else None
    fit = figures.draw("desc-fit_plot.png", lambda path: _fit(result.fit, path)) if result.fit else None

    participants = []
    for label, path in result.participants.items():
        image = figures.load(path, f"sub-{label} in group space")
        thumbnail = figures.draw(f"sub-{label}_space-group_T1w.png", lambda out: _anatomy(
            image, out, contours=template, cuts=cuts, size=THUMBNAIL_SIZE)) \
            if image is not None and template is not None else None
        report = output_dir / f"sub-{label}.html"
        participants.append({"label": label, "image": path, "fit": result.fit.get(label), "thumbnail": thumbnail,
                             "report": report if report.is_file() else None})

    return _render(output_dir, "group.html", "group.html", {
        "title": "Group template", "result": result, "template_figure": template_figure, "montage": montage,
        "convergence_figure": convergence, "updates": updates, "fit_figure": fit,
        "participants": participants, "errors": figures.problems,
    })


class _Figures:
    """Loads a report's images and draws its figures into ``folder``; what fails becomes a message."""

    def __init__(self, folder: Path):
        self.folder, self.problems = folder, []

    def load(self, path: Path, what: str, *, maps: bool = False) -> Image | None:
        """The image at ``path`` (``maps``: may be all zeros, e.g. a log-Jacobian of no change), or None."""
        try:
            if maps:
                img, data = read_nibabel(path)
                return Image(np.asarray(data, dtype=np.float32).squeeze(), np.asarray(img.affine), str(path))
            return load_image(path)
        except RwcflowError as exc:
            self.problems.append(f"The {what} could not be shown: {exc}")
            return None

    def draw(self, name: str, plot: Callable[[Path], object]) -> Path:
        """``plot(tmp)`` writes the figure ``name`` atomically; its final path."""
        return atomic_write(self.folder / name, plot)


def _nifti(image: Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(image.data, dtype=np.float32), image.affine)


def _centre(image: Image) -> tuple[float, float, float]:
    """World coordinates (mm) of the intensity-weighted centre of ``image``: where its slices cut."""
    weights = np.clip(image.data, 0, None).astype(np.float64)
    points = image.grid.world_points()
    return tuple(float(c) for c in (points * weights[..., None]).sum(axis=(0, 1, 2)) / max(weights.sum(), 1e-12))


def _intensity_range(image: Image) -> tuple[float, float]:
    """Display range: 0 to the 99.5th percentile of the non-zero voxels."""
    values = image.data[image.data > 0]
    return 0.0, (float(np.percentile(values, 99.5)) if values.size else 1.0)


def _tissue_means(values: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Mean intensities of the three classes of a T1w brain's voxels (CSF, grey and white matter, in this
    order): 1-D k-means (Lloyd's iterations) from the 10th, 50th and 90th percentiles, on at most 10^5 values."""
    values = values[:: max(1, values.size // 100_000)]
    means = np.percentile(values, [10.0, 50.0, 90.0])
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - means).argmin(axis=1)
        means = np.array([values[nearest == k].mean() if np.any(nearest == k) else means[k] for k in range(3)])
    return means


def _contour_levels(image: Image) -> list[float]:
    """The brain outline (10 % of the 99th percentile, :func:`rwcflow.maps.foreground_mask`'s level) and the
    grey/white-matter boundary (half-way between the two brighter tissue means inside the brain)."""
    outline = 0.1 * float(np.percentile(image.data, 99))
    inside = image.data[image.data > outline]
    if inside.size < 3:
        return [outline]
    means = _tissue_means(inside)
    return [outline, float(means[1] + means[2]) / 2]


def _anatomy(image: Image, path: Path, *, contours: Image | None = None, cuts=None,
             scale: tuple[float, float] | None = None, size=ORTHO_SIZE) -> None:
    """Orthogonal slices of ``image`` through ``cuts`` (world mm), with ``contours``' outlines drawn on."""
    low, high = scale or _intensity_range(image)
    figure = Figure(figsize=size, facecolor="black")
    display = plotting.plot_anat(_nifti(image), figure=figure, display_mode="ortho", cut_coords=cuts,
                                 annotate=False, draw_cross=False, black_bg=True, colorbar=False, dim=0,
                                 vmin=low, vmax=high)
    if contours is not None:
        for level, colour in zip(_contour_levels(contours), CONTOUR_COLOURS):
            display.add_contours(_nifti(contours), levels=[level], colors=[colour], linewidths=0.8)
    figure.savefig(path, dpi=DPI, facecolor="black")


def _change_in_brain(change: Image, template: Image) -> Image:
    """The log-Jacobian map on the template's grid, 0 outside the template's brain."""
    if change.grid != template.grid:
        change = resample(change, template.grid)
    brain = template.data > _contour_levels(template)[0]
    return change.with_data(np.where(brain, change.data, 0.0).astype(np.float32))


def _log_jacobian(change: Image, template: Image, path: Path) -> None:
    """A log-Jacobian map (0 outside the brain, not all 0) on the template: symmetric colour scale to the
    99.5th percentile of its magnitude, values under a twentieth of that left out, and a colour bar."""
    magnitude = np.abs(change.data[change.data != 0])
    limit = float(np.percentile(magnitude, 99.5))
    figure = Figure(figsize=ORTHO_SIZE, facecolor="black")
    plotting.plot_stat_map(_nifti(change), bg_img=_nifti(template), figure=figure, display_mode="ortho",
                           cmap="RdBu_r", vmax=limit, symmetric_cbar=True, threshold=limit / 20, colorbar=True,
                           annotate=False, draw_cross=False, black_bg=True, dim=0)
    figure.savefig(path, dpi=DPI, facecolor="black")


def _montage(images: list[Image], path: Path, cuts) -> None:
    """One column per iteration template: an axial and a sagittal slice through ``cuts``."""
    columns = len(images)
    figure = Figure(figsize=(1.6 * columns, 3.8), facecolor="black")
    for column, image in enumerate(images):
        low, high = _intensity_range(image)
        for row, (mode, cut) in enumerate((("z", cuts[2]), ("x", cuts[0]))):
            axes = figure.add_axes((column / columns, 0.47 - 0.45 * row, 1 / columns, 0.44))
            plotting.plot_anat(_nifti(image), figure=figure, axes=axes, display_mode=mode, cut_coords=[cut],
                               annotate=False, draw_cross=False, black_bg=True, colorbar=False, dim=0,
                               vmin=low, vmax=high)
        figure.text((column + 0.5) / columns, 0.99, "initial" if column == 0 else f"iteration {column}",
                    color="white", ha="center", va="top", fontsize=9)
    figure.savefig(path, dpi=DPI, facecolor="black")


def _convergence(updates: list[dict], path: Path) -> None:
    """Norm of the template's shape update (mm) against the update number."""
    figure = Figure(figsize=(4.5, 2.8))
    axes = figure.add_subplot()
    numbers = [entry.get("update", n) for n, entry in enumerate(updates, start=1)]
    axes.plot(numbers, [entry["update_norm_mm"] for entry in updates], "o-", color="#1f77b4")
    axes.set(xlabel="update", ylabel="shape update norm (mm)", ylim=(0, None), xticks=numbers)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def _fit(fit: dict[str, float], path: Path) -> None:
    """Each participant's fit to the template, one dot each (the axis spans the values, so small
    differences show)."""
    labels = list(fit)
    figure = Figure(figsize=(4.5, 0.9 + 0.28 * len(labels)))
    axes = figure.add_subplot()
    axes.plot([fit[label] for label in labels], range(len(labels)), "o", color="#4c72b0")
    axes.set_yticks(range(len(labels)), [f"sub-{label}" for label in labels])
    axes.set(xlabel="fit to the template", ylim=(len(labels) - 0.5, -0.5))
    axes.margins(x=0.15)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                         undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _render(output_dir: Path, name: str, template: str, context: dict) -> Path:
    """Render ``template`` into ``output_dir/name`` atomically; paths become links relative to ``output_dir``."""

    def link(path: Path | None) -> str | None:
        """The relative link to ``path`` if it lies in the output folder (moves with it), else None."""
        if path is None:
            return None
        path, root = Path(path).resolve(), output_dir.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) and path.is_file() else None

    methods = citation_text().split("\n## References")[0]
    paragraphs = [" ".join(block.split()) for block in methods.split("\n\n") if block and not block.startswith("#")]
    html = _TEMPLATES.get_template(template).render(
        **context, link=link, value=_format, version=rwcflow_version(), generated=time.strftime("%Y-%m-%d %H:%M %Z"),
        citation=paragraphs, references=REFERENCES, basename=lambda path: os.path.basename(str(path)))
    return atomic_write(output_dir / name, lambda tmp: tmp.write_text(html, encoding="utf-8"))


def _format(value) -> str:
    """A metric or parameter for a table: floats to 4 significant digits, lists joined, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format(item) for item in value)
    return str(value)
