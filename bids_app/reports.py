"""HTML reports of the BIDS App, as fMRIPrep writes them: one per participant (``sub-<label>.html``) and
one for the group (``group.html``) at the top of the derivatives folder, their figures in
``sub-<label>/figures/`` and ``figures/``. Every link is relative, so the folder can be moved; every
file is written atomically.

A participant with two or more sessions gets, per later session ``k``, the map of its change since the
first session, ``Δ log J = log J_k - log J_1`` (the log of the local volume ratio session k / session 1,
both Jacobians of template->session mappings on the within-subject template's grid), and a table of its
largest clusters of change (:func:`change_clusters`). Every report's summary states what ran: the command
line, the options (with the model file's sha256) and a methods paragraph generated from them
(:func:`methods`, also written to ``logs/CITATION.md`` by :func:`citation_text`).

Figures are nilearn drawings (PNG) on matplotlib figures made without pyplot, so no backend is switched
and nothing is left open. A figure whose input cannot be read is replaced by a message in the report's
error box; the rest of the report is still written.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.figure import Figure
from nilearn import plotting
from scipy import ndimage

import rwcflow
from rwcflow.errors import RwcflowError
from rwcflow.io import Grid, Image, atomic_write, load_image, read_nibabel, resample
from rwcflow.optimize import FROM_ZERO, REFINING

from .spaces import UNBIASED

DPI = 80
ORTHO_SIZE = (7.5, 2.6)
THUMBNAIL_SIZE = (5.0, 1.75)
CONTOUR_COLOURS = ("#ff3b3b", "#ffd700")
"""Colours of the brain outline and of the grey/white-matter boundary drawn from a template."""
NO_CHANGE = 1e-4
"""A change map whose magnitude stays under this in the brain (0.01 % volume change) is not drawn."""
CHANGE_THRESHOLD = 0.02
"""|Δ log J| from which a voxel is coloured in the change maps and belongs to a cluster of change (about 2 %
volume change): fixed, so that maps and tables compare across sessions and participants and a session
without change shows none (a percentile of the map's own values always finds some)."""
LARGEST_CLUSTERS = 5
"""Clusters of each sign listed per change map."""
CUT_SMOOTHING_VOXELS = 1.0
"""Gaussian sigma (voxels) of the |Δ log J| whose largest value places the cuts: not a single noisy voxel."""
CHANGE_PERCENTILE = 99.9
"""The change maps' colour scale: this percentile of |Δ log J| over the brain, all of a participant's sessions."""


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
    parameters: dict = field(default_factory=dict)   # the run's options (RunOptions.parameters()); {}: unknown
    errors: list[str] = field(default_factory=list)  # messages shown in a red box
    command: str = ""                                # the command line that ran, shown in the summary


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
    command: str = ""


@dataclass(frozen=True)
class Cluster:
    """A connected region (26-connectivity) of change of one sign, ``|Δ log J| >= threshold`` throughout."""

    sign: int                                # -1: volume loss, +1: gain
    voxels: int
    volume_mm3: float
    peak_mm: tuple[float, float, float]      # world (RAS mm) centre of its voxel of largest |Δ log J|
    peak: float                              # Δ log J there
    mean: float                              # mean Δ log J over the cluster

    @property
    def kind(self) -> str:
        return "loss" if self.sign < 0 else "gain"


WORKS = {
    "bids": ("Gorgolewski et al., 2016",
             "Gorgolewski KJ et al. The brain imaging data structure, a format for organizing and describing "
             "outputs of neuroimaging experiments. Scientific Data 3:160044, 2016."),
    "bids-apps": ("Gorgolewski et al., 2017",
                  "Gorgolewski KJ et al. BIDS apps: Improving ease of use, accessibility, and reproducibility of "
                  "neuroimaging data analysis methods. PLoS Computational Biology 13(3):e1005209, 2017."),
    "pydra": ("Jarecka et al., 2020",
              "Jarecka D et al. Pydra - a flexible and lightweight dataflow engine for scientific analyses. "
              "Proceedings of the 19th Python in Science Conference (SciPy 2020)."),
    "rwcnet": ("Sivan et al., 2023",
               "Sivan V, Vujovic T, Ranabhat R, Wong A, McLachlin S, Hardisty M. Recurrence With Correlation "
               "Network for Medical Image Registration. arXiv:2302.02283, 2023 (MICCAI Learn2Reg 2022 challenge)."),
    "raft": ("Teed and Deng, 2020",
             "Teed Z, Deng J. RAFT: Recurrent All-Pairs Field Transforms for Optical Flow. ECCV 2020."),
    "mind": ("Heinrich et al., 2013",
             "Heinrich MP, Jenkinson M, Papiez BW, Brady M, Schnabel JA. Towards realtime multimodal fusion for "
             "image-guided interventions using self-similarities. MICCAI 2013, LNCS 8149:187-194."),
    "convexadam": ("Siebert et al., 2022",
                   "Siebert H, Hansen L, Heinrich MP. Fast 3D registration with accurate optimisation and little "
                   "learning for Learn2Reg 2021. MICCAI 2021 challenges, LNCS 13166:174-179, 2022."),
    "templates": ("Avants et al., 2010",
                  "Avants BB, Yushkevich P, Pluta J, Minkoff D, Korczykowski M, Detre J, Gee JC. The optimal "
                  "template effect in hippocampus studies of diseased populations. NeuroImage 49(3):2457-2466, 2010."),
    "asymmetry": ("Yushkevich et al., 2010",
                  "Yushkevich PA, Avants BB, Das SR, Pluta J, Altinay M, Craige C. Bias in estimation of "
                  "hippocampal atrophy using deformation-based morphometry arises from asymmetric global "
                  "normalization: an illustration in ADNI 3 T MRI data. NeuroImage 50(2):434-445, 2010."),
    "inverse-consistent": ("Reuter et al., 2010",
                           "Reuter M, Rosas HD, Fischl B. Highly accurate inverse consistent registration: a robust "
                           "approach. NeuroImage 53(4):1181-1196, 2010."),
}
"""The works the methods text may cite: key -> (in-text citation, reference)."""

Cite = Callable[..., str]
"""``cite(*keys)``: the in-text citation of the works ``keys`` of :data:`WORKS`, recorded for the reference list."""


def rwcflow_version() -> str:
    """rwcflow's version: the package attribute, else the installed distribution's, else "unknown"."""
    version = getattr(rwcflow, "__version__", None)
    if version:
        return version
    try:
        return importlib.metadata.version("rwcflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def methods(parameters: Mapping) -> tuple[list[str], list[str]]:
    """The methods paragraphs for the run's options ``parameters`` (:meth:`RunOptions.parameters
    <rwcflow.bids_app.options.RunOptions.parameters>`: ``template``, ``model``, ``model_sha256``,
    ``io_iters``, ``refine_iters``, ``group_iterations``), and the references
    they cite, in order of first citation: exactly those."""
    cited: list[str] = []

    def cite(*keys: str) -> str:
        cited.extend(key for key in keys if key not in cited)
        return "; ".join(WORKS[key][0] for key in keys)

    paragraphs = [
        f"Structural images were processed with rwcflow {rwcflow_version()}, a BIDS App ({cite('bids', 'bids-apps')}) "
        f"for deformable registration of brain MRI built on Pydra ({cite('pydra')}). {_registration(parameters, cite)}",
        _within_subject(parameters, cite),
        _group(parameters, cite),
        "The options of this run are listed in the reports and in the derivatives' JSON sidecars (key rwcflow). "
        "This text was generated by rwcflow from them; we release it under the CC0 licence so that it can be "
        "copied into manuscripts unchanged. Please cite the references below.",
    ]
    return paragraphs, [WORKS[key][1] for key in cited]


def _registration(parameters: Mapping, cite: Cite) -> str:
    """What every registration did: an affine pre-alignment, then the network and instance optimisation
    that ran (either, both or neither)."""
    model, io_iters = str(parameters["model"]), parameters["io_iters"]
    if model.lower() == "none" and io_iters == 0:
        return ("Each registration was an affine pre-alignment only: neither a network (option --model none; "
                "rwcflow's default is RWCNet) nor instance optimisation (--io-iters 0) was used.")
    if model.lower() == "none":
        return (f"Each registration was an affine pre-alignment followed by instance optimisation alone, without "
                f"a network (option --model none; rwcflow's default, RWCNet, was not used): "
                f"{_steps(io_iters, FROM_ZERO['iterations'])} per level of a coarse-to-fine pyramid on "
                f"{_instance(cite)}.")
    weights = "the weights shipped with rwcflow" if model.lower() == "default" else \
        f"the weights of the model file {Path(model).name}"
    network = (f"Each registration was an affine pre-alignment followed by the Recurrence With Correlation Network "
               f"(RWCNet; {cite('rwcnet')}), a coarse-to-fine network that refines a displacement field recurrently "
               f"from local correlation cost volumes after the manner of RAFT ({cite('raft')}), with {weights} "
               f"(sha256 {parameters['model_sha256']})")
    if io_iters == 0:
        return f"{network}, without instance optimisation (--io-iters 0)."
    return (f"{network}; its field was then refined by instance optimisation, "
            f"{_steps(io_iters, REFINING['iterations'])} on {_instance(cite)}.")


def _instance(cite: Cite) -> str:
    """Instance optimisation's similarity and regulariser, cited."""
    return f"a MIND-SSC similarity with a diffusion regulariser, as in ConvexAdam ({cite('mind', 'convexadam')})"


def _steps(io_iters: int | None, default: int) -> str:
    """Instance optimisation's Adam steps: ``io_iters``, or rwcflow's ``default`` when it is None."""
    return _count(default, "Adam step") + " (rwcflow's default)" if io_iters is None else _count(io_iters, "Adam step")


def _within_subject(parameters: Mapping, cite: Cite) -> str:
    """The within-subject template: the rigid midspace, the joint refinement (or none) and the change maps."""
    refine = parameters["refine_iters"]
    refinement = (f"Their transforms were then refined jointly ({_count(refine, 'L-BFGS iteration')}): each session, "
                  f"resampled alike through its transform, was compared by local correlation with the mean of the "
                  f"others rather than with a template, with smooth corrections of zero mean, as in symmetric "
                  f"longitudinal registration ({cite('asymmetry')}); the template is the mean of the resampled "
                  f"sessions.") if refine else \
        ("Their transforms were not refined (--refine-iters 0): they are rigid, and the change maps show no "
         "change; the template is the mean of the resampled sessions.")
    return (f"For each participant with several sessions, an unbiased within-subject template was built: the "
            f"sessions were aligned rigidly into the space half-way between them, as in FreeSurfer's longitudinal "
            f"stream ({cite('inverse-consistent')}), so that no session is privileged. {refinement} Each session "
            f"was resampled into the template in one interpolation, and the Jacobian determinant of its transform "
            f"and its logarithm were computed in template space for tensor-based morphometry; the change between "
            f"two sessions is the difference of their log-Jacobian maps.")


def _group(parameters: Mapping, cite: Cite) -> str:
    """The group template: registered to a given one, or built from the data (the group level)."""
    template, updates = parameters["template"], _count(parameters["group_iterations"], "template update")
    built = ("A group template, when built (rwcflow's group level), was made from the participants' "
             "within-subject templates by iterative groupwise registration (register every template to the current "
             f"one, average, remove the mean shape; as in ANTs' template construction, {cite('templates')})")
    if template == UNBIASED:
        return f"{built}, with {updates}."
    return (f"Each within-subject template was registered to the group template {template}, and every session was "
            f"carried into it through the composition of the two transforms (one interpolation). {built}, "
            f"starting from {template}, with {updates}.")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def citation_text(parameters: Mapping) -> str:
    """The methods boilerplate (Markdown) for manuscripts: :func:`methods` of the run's options ``parameters``
    and the references they cite."""
    paragraphs, references = methods(parameters)
    listed = "\n".join(f"{n}. {reference}" for n, reference in enumerate(references, start=1))
    return "# Methods boilerplate\n\n" + "\n\n".join(paragraphs) + f"\n\n## References\n\n{listed}\n"


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
    changes, limit = ([], None) if template is None else _change_views(figures, sub, result.sessions, template)

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
        "group_figure": group, "metric_names": metric_names, "changes": changes, "change_limit": limit,
        "change_threshold": CHANGE_THRESHOLD, "change_percentile": CHANGE_PERCENTILE,
        "cut_smoothing": CUT_SMOOTHING_VOXELS, "largest_clusters": LARGEST_CLUSTERS,
        "errors": [*result.errors, *figures.problems],
    }, result.parameters)


def _prefix(sub: str, session: SessionResult) -> str:
    return sub if session.session is None else f"{sub}_ses-{session.session}"


def _title(session: SessionResult) -> str:
    return "Session" if session.session is None else f"Session {session.session}"


def _session_view(figures: _Figures, sub: str, session: SessionResult, template: Image | None, cuts) -> dict:
    """A session's section of the participant report: the session and its registration figures (None if
    not drawn)."""
    view = {"id": _prefix(sub, session), "title": _title(session), "result": session, "before": None, "after": None}
    if template is None:
        return view
    registered = figures.load(session.registered, "registered session")
    raw = figures.load(session.t1w, "session")
    if registered is not None and raw is not None:
        scale = _intensity_range(registered)
        view["before"] = figures.draw(f"{view['id']}_desc-before_T1w.png", lambda path: _anatomy(
            resample(raw, template.grid), path, contours=template, cuts=cuts, scale=scale))
        view["after"] = figures.draw(f"{view['id']}_desc-after_T1w.png", lambda path: _anatomy(
            registered, path, contours=template, cuts=cuts, scale=scale))
    return view


def _change_views(figures: _Figures, sub: str, sessions: list[SessionResult],
                  template: Image) -> tuple[list[dict], float | None]:
    """Per later session ``k`` with a readable map, its change since the first session: ``Δ log J = log J_k -
    log J_1`` on the template's grid, 0 outside the template's brain; its map (None when flat: under
    :data:`NO_CHANGE` throughout), drawn through the point of largest smoothed change, and its clusters.
    Also the colour scale shared by the maps (None without one): :data:`CHANGE_PERCENTILE` of |Δ log J|
    over the brain in all of them, at least :data:`CHANGE_THRESHOLD`."""
    mapped = [session for session in sessions if session.log_jacobian is not None]
    if len(mapped) < 2:
        return [], None
    brain = template.data > _outline_level(template)

    def log_jacobian(session: SessionResult) -> np.ndarray | None:
        image = figures.load(session.log_jacobian, f"log-Jacobian map of {_title(session).lower()}", maps=True)
        if image is None:
            return None
        if image.grid != template.grid:
            image = resample(image, template.grid)
        return np.where(brain, image.data, 0.0).astype(np.float32)

    first, *later = mapped
    reference = log_jacobian(first)
    if reference is None:
        return [], None
    loaded = [(session, log_jacobian(session)) for session in later]
    deltas = [(session, values - reference) for session, values in loaded if values is not None]
    if not deltas:
        return [], None
    magnitudes = np.concatenate([np.abs(delta[brain]) for _, delta in deltas])
    limit = max(float(np.percentile(magnitudes, CHANGE_PERCENTILE)), CHANGE_THRESHOLD)
    views = []
    for session, delta in deltas:
        name = f"{_prefix(sub, session)}_desc-change_map.png"
        change = template.with_data(delta)
        cut = _largest_change(delta, brain, template.grid)
        flat = float(np.abs(delta).max()) < NO_CHANGE
        views.append({"id": f"{_prefix(sub, session)}_change", "title": f"{_title(session)} − {_title(first).lower()}",
                      "cut": cut, "clusters": change_clusters(delta, template.grid),
                      "figure": None if flat else figures.draw(name, lambda path: _change_map(
                          change, template, path, limit=limit, cut=cut))})
    return views, limit


def change_clusters(delta: np.ndarray, grid: Grid, threshold: float = CHANGE_THRESHOLD,
                    largest: int = LARGEST_CLUSTERS) -> list[Cluster]:
    """The ``largest`` clusters of volume loss (``delta <= -threshold``), then of gain (``delta >= threshold``),
    of the change map ``delta`` on ``grid``, each sign largest first (26-connectivity; equal volumes in
    array order). A cluster's peak is its first voxel (array order) of largest |delta|."""
    clusters = []
    voxel_mm3 = abs(float(np.linalg.det(grid.affine[:3, :3])))
    for sign in (-1, 1):
        signed = sign * np.asarray(delta, dtype=np.float64)
        labels, count = ndimage.label(signed >= threshold, structure=np.ones((3, 3, 3), dtype=bool))
        index = np.arange(1, count + 1)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        means = ndimage.mean(delta, labels, index)
        peaks = ndimage.maximum_position(signed, labels, index)
        for n in np.argsort(-sizes, kind="stable")[:largest]:
            peak = tuple(int(i) for i in peaks[n])
            clusters.append(Cluster(sign, int(sizes[n]), float(sizes[n] * voxel_mm3),
                                    tuple(float(c) for c in grid.voxel_to_world(np.array(peak, dtype=np.float64))),
                                    float(delta[peak]), float(means[n])))
    return clusters


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
    }, result.parameters)


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


def _outline_level(image: Image) -> float:
    """The brain outline: 10 % of the 99th percentile, :func:`rwcflow.maps.foreground_mask`'s level."""
    return 0.1 * float(np.percentile(image.data, 99))


def _contour_levels(image: Image) -> list[float]:
    """The brain outline (:func:`_outline_level`) and the grey/white-matter boundary (half-way between the
    two brighter tissue means inside the brain)."""
    outline = _outline_level(image)
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


def _largest_change(delta: np.ndarray, brain: np.ndarray, grid: Grid) -> tuple[float, float, float]:
    """World coordinates (RAS mm) of the brain voxel of largest |Δ log J| smoothed by a Gaussian of
    :data:`CUT_SMOOTHING_VOXELS`."""
    smoothed = np.abs(ndimage.gaussian_filter(delta.astype(np.float64), CUT_SMOOTHING_VOXELS))
    voxel = np.unravel_index(np.argmax(np.where(brain, smoothed, -1.0)), delta.shape)
    return tuple(float(c) for c in grid.voxel_to_world(np.array(voxel, dtype=np.float64)))


def _change_map(change: Image, template: Image, path: Path, *, limit: float, cut) -> None:
    """A change map on the template, cut through ``cut`` (world mm, marked by a cross; L/R and the cuts'
    coordinates annotated): symmetric colour scale to ``limit``, values under :data:`CHANGE_THRESHOLD` left
    out, and a colour bar."""
    figure = Figure(figsize=ORTHO_SIZE, facecolor="black")
    plotting.plot_stat_map(_nifti(change), bg_img=_nifti(template), figure=figure, display_mode="ortho",
                           cut_coords=cut, cmap="RdBu_r", vmax=limit, symmetric_cbar=True,
                           threshold=CHANGE_THRESHOLD, colorbar=True, annotate=True, draw_cross=True,
                           black_bg=True, dim=0)
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


def _render(output_dir: Path, name: str, template: str, context: dict, parameters: Mapping) -> Path:
    """Render ``template`` into ``output_dir/name`` atomically, with the methods text of the run's options
    ``parameters`` (none when they are unknown, ``{}``); paths become links relative to ``output_dir``."""

    def link(path: Path | None) -> str | None:
        """The relative link to ``path`` if it lies in the output folder (moves with it), else None."""
        if path is None:
            return None
        path, root = Path(path).resolve(), output_dir.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) and path.is_file() else None

    paragraphs, references = methods(parameters) if parameters else ([], [])
    html = _TEMPLATES.get_template(template).render(
        **context, link=link, value=_format, version=rwcflow_version(), generated=time.strftime("%Y-%m-%d %H:%M %Z"),
        citation=paragraphs, references=references, basename=lambda path: os.path.basename(str(path)))
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
