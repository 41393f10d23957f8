"""The bundled example BIDS dataset, with its ground truth: ``rwcflow-demo-data OUT [--participants N]
[--sessions S] [--resolution MM] [--atrophy PERCENT] [--seed K]``.

A small valid BIDS raw dataset (``sub-01``, ``sub-02``, ... with sessions ``ses-1``, ``ses-2``, ..., one
T1w image each) made from real anatomy, the skull-stripped MNI152 2009a template shipped in nilearn:

* each participant is the template deformed by its own known random smooth field (inter-subject
  anatomy, up to 8 mm), moved by a small rigid transform (stored in the header affine) and given an
  intensity change: the example pair of :func:`rwcflow.example.make_example_pair`, one seed each;
* every later session is session 1 with a simulated local atrophy: a sphere around the left hippocampus
  (MNI (-26, -22, -14) mm, radius 12 mm) shrunk by ``atrophy_percent`` % of its volume per session
  (session ``k`` has lost ``(k - 1) * atrophy_percent`` %), resampled by cubic-spline interpolation (which
  keeps the image's sharpness, as a new scan would, where trilinear resampling would blur the sphere's
  inside only), then a tiny rigid repositioning (of the header);
* every session gets its own Gaussian noise inside the brain (background stays 0, as after skull
  stripping), that of a 1 mm scan averaged over the voxel's volume (:data:`NOISE_FRACTION_1MM`).

The truth is stored under ``sourcedata/truth/`` (which BIDS validators ignore): the cropped template,
per participant the template->session-1 mapping and each later session's session-1->session mapping as
ITK/ANTs displacement fields, and a JSON file with the sphere (centre, radius, true volume change) in
every session's world coordinates. The whole dataset is written into a temporary folder beside ``OUT``
and renamed into place: it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from rwcflow import __version__, spatial, transforms
from rwcflow.errors import InputError, RwcflowError
from rwcflow.example import make_example_pair, rigid_matrix
from rwcflow.io import Grid, Image, atomic_write, save_image

PROG = "rwcflow-demo-data"
TEMPLATE = "MNI152NLin2009aSym"
LEFT_HIPPOCAMPUS_MNI_MM = (-26.0, -22.0, -14.0)
ATROPHY_RADIUS_MM = 12.0
ANATOMY_DISPLACEMENT_MM = 8.0
NOISE_FRACTION_1MM = 0.02
"""Noise standard deviation of a 1 mm scan, as a fraction of the 99th percentile of the brain's intensities.
A voxel of ``v`` mm³ averages ``v`` such voxels: its noise is ``NOISE_FRACTION_1MM / sqrt(v)`` (0.38 % at 3 mm)."""
REPOSITIONING = (1.0, 1.0)
"""Largest rotation (degrees, per axis) and shift (mm, per axis) of a later session against session 1."""

MNI_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation "
    "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in "
    "all copies. The authors and McGill University make no representations about the suitability of this "
    "software for any purpose. It is provided \"as is\" without express or implied warranty. The authors are "
    "not responsible for any data loss, equipment damage, property loss, or injury to subjects or patients "
    "resulting from the use or misuse of this software package."
)
MNI_REFERENCES = [
    "Fonov VS, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate "
    "atlases for pediatric studies. NeuroImage 54(1):313-327, 2011. doi:10.1016/j.neuroimage.2010.07.033",
    "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate brain "
    "templates from birth to adulthood. NeuroImage 47(S1):S102, 2009. doi:10.1016/S1053-8119(09)70884-5",
]


def shrink_sphere(grid: Grid, centre_mm: Sequence[float], radius_mm: float, loss: float) -> torch.Tensor:
    """Pull-back field ``(1, 3, X, Y, Z)`` in voxels of ``grid`` that shrinks a sphere by ``loss`` of its volume.

    ``u(x) = a w(r) (x - c)``: ``w = 1`` within ``radius_mm`` of ``centre_mm`` (world mm), a uniform
    scaling with ``(1 + a)^-3 = 1 - loss``, so the ball of ``radius_mm`` in the warped image holds what
    filled the ball of ``(1 + a) radius_mm`` before; ``w`` fades by a raised cosine to 0 at twice the
    radius (identity beyond). Exact for any affine grid, since the scaling is about a point.
    """
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"volume loss must be in [0, 1), got {loss}")
    scale = (1.0 - loss) ** (-1.0 / 3.0) - 1.0
    centre_mm = np.asarray(centre_mm, dtype=np.float64)
    distance = np.linalg.norm(grid.world_points() - centre_mm, axis=-1)
    fade = np.clip(distance / radius_mm - 1.0, 0.0, 1.0)
    weight = 0.5 * (1.0 + np.cos(np.pi * fade))
    offset = np.indices(grid.shape, dtype=np.float64) - grid.world_to_voxel(centre_mm).reshape(3, 1, 1, 1)
    return torch.from_numpy((scale * weight * offset)[None].astype(np.float32))


T1W_SIDECAR = {
    "Manufacturer": "none (synthetic image)",
    "ManufacturersModelName": PROG,
    "SoftwareVersions": f"rwcflow {__version__}",
    "SkullStripped": True,
}


@dataclass
class DemoParticipant:
    """One participant in memory: its session images (session 1 first), the truth files' contents."""

    label: str
    sessions: list[Image]
    template: Image
    anatomy_displacement: np.ndarray
    atrophy_displacements: list[np.ndarray]
    truth: dict

    def write(self, root: Path) -> None:
        """Write the T1w images with sidecars into the BIDS folder ``root`` and the truth under
        ``root/sourcedata/truth/sub-<label>/``."""
        sub = f"sub-{self.label}"
        for number, image in enumerate(self.sessions, start=1):
            stem = root / sub / f"ses-{number}" / "anat" / f"{sub}_ses-{number}_T1w"
            save_image(image, stem.with_name(stem.name + ".nii.gz"))
            _write_json(stem.with_name(stem.name + ".json"), T1W_SIDECAR)
        truth = root / "sourcedata" / "truth" / sub
        sessions = self.truth["atrophy"]["sessions"]
        transforms.write_displacement_field(truth / self.truth["anatomy"]["xfm"], self.anatomy_displacement,
                                            self.template.grid)
        for number, (image, disp) in enumerate(zip(self.sessions[1:], self.atrophy_displacements), start=2):
            transforms.write_displacement_field(truth / sessions[f"ses-{number}"]["xfm"], disp, image.grid)
        _write_json(truth / f"{sub}_truth.json", self.truth)


def shrunk_image(image: Image, centre_mm: Sequence[float], radius_mm: float, loss: float) -> tuple[np.ndarray, torch.Tensor]:
    """``image``'s data with the sphere shrunk by ``loss`` of its volume (:func:`shrink_sphere`), resampled
    by cubic spline (the spline's ripples off the brain zeroed), and the pull-back field it was resampled through."""
    field = shrink_sphere(image.grid, centre_mm, radius_mm, loss)
    coords = np.indices(image.grid.shape, dtype=np.float64) + field[0].double().numpy()
    shrunk = np.maximum(ndimage.map_coordinates(image.data, coords, order=3, mode="nearest"), 0.0)
    shrunk[spatial.warp(image.tensor(), field)[0, 0].numpy() == 0] = 0.0
    return shrunk, field


def intensity_change(image: Image, amount: float, rng: np.random.Generator) -> np.ndarray:
    """``image``'s data times a gain within ``1 ± amount`` and a linear bias field along a random direction,
    from ``1 - amount`` to ``1 + amount`` across the grid: a session acquired with other scanner settings
    (0: none)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    middle = (np.array(image.grid.shape, dtype=np.float64).reshape(3, 1, 1, 1) - 1) / 2
    ramp = np.tensordot(direction, (np.indices(image.grid.shape) - middle) / np.maximum(middle, 1), axes=1)
    ramp /= max(np.abs(ramp).max(), 1e-12)  # from -1 to 1 across the grid
    gain = rng.uniform(1.0 - amount, 1.0 + amount)
    return (image.data * gain * (1.0 + amount * ramp)).astype(np.float32)


def make_participant(label: str, *, sessions: int = 2, resolution_mm: float = 3.0,
                     atrophy_percent: float = 5.0, seed: int = 0, brain: tuple[Image, Image] | None = None,
                     template: str = TEMPLATE, site: str = "the left hippocampus",
                     centre_mm: Sequence[float] = LEFT_HIPPOCAMPUS_MNI_MM, radius_mm: float = ATROPHY_RADIUS_MM,
                     repositioning: tuple[float, float] = REPOSITIONING,
                     session_intensity: float = 0.0) -> DemoParticipant:
    """One participant of the demo dataset (see the module docstring), reproducible from ``seed``.

    The defaults make the demo's participants; a benchmark varies them: ``brain`` (image and labels on one
    grid, named ``template``; default the MNI152 brain at ``resolution_mm``), the atrophy's ``site``
    (a name) at ``centre_mm`` (the brain's world coordinates) with ``radius_mm``, a later session's
    ``repositioning`` (largest rotation in degrees and shift in mm per axis) and its
    :func:`intensity_change` ``session_intensity``.
    """
    pair = make_example_pair(resolution_mm=resolution_mm, max_displacement_mm=ANATOMY_DISPLACEMENT_MM, seed=seed,
                             brain=brain)
    resolution_mm = float(np.mean(pair.fixed.grid.spacing))
    rng = np.random.default_rng([seed, 1])
    gain = float(rng.uniform(800.0, 1200.0))
    first = pair.moving.with_data((gain * pair.moving.data).astype(np.float32))
    noise_std = NOISE_FRACTION_1MM / resolution_mm**1.5 * float(np.percentile(first.data[first.data > 0], 99))

    # where the brain's site lies in session 1: the brain voxel x is the moving voxel x + v(x)
    centre = pair.fixed.grid.world_to_voxel(np.asarray(centre_mm, dtype=np.float64))
    point = torch.from_numpy(centre.reshape(1, 3, 1, 1, 1)).float()
    centre_voxel = centre + spatial.sample(pair.true_field, point)[0, :, 0, 0, 0].double().numpy()
    centre_ses1 = first.grid.voxel_to_world(centre_voxel)

    images, displacements = [_noisy(first, noise_std, rng)], []
    atrophy = {"ses-1": {"centre_mm": centre_ses1.round(4).tolist(), "volume_change_percent": 0.0}}
    middle = first.grid.voxel_to_world((np.array(first.grid.shape) - 1) / 2.0)
    for number in range(2, sessions + 1):
        loss = (number - 1) * atrophy_percent / 100.0
        shrunk, field = shrunk_image(first, centre_ses1, radius_mm, loss)
        if session_intensity:
            shrunk = intensity_change(first.with_data(shrunk), session_intensity, rng)
        angle, shift = repositioning
        move = rigid_matrix(rng.uniform(-angle, angle, 3), rng.uniform(-shift, shift, 3), middle)
        grid = Grid(first.grid.shape, move @ first.affine)
        images.append(_noisy(Image(shrunk, grid.affine), noise_std, rng))
        # session-k world -> session-1 world is move^-1, after the atrophy field on session k's grid
        displacements.append(transforms.compose_world_displacement(grid, np.linalg.inv(move), field))
        atrophy[f"ses-{number}"] = {
            "centre_mm": (move[:3, :3] @ centre_ses1 + move[:3, 3]).round(4).tolist(),
            "volume_change_percent": -100.0 * loss,
            "xfm": f"sub-{label}_from-ses1_to-ses{number}_mode-image_xfm.nii.gz",
            "rigid_from_ses1_ras": move.round(8).tolist(),
        }
    truth = {
        "participant_id": f"sub-{label}",
        "seed": seed,
        "noise_std": noise_std,
        "intensity_gain": gain,
        "anatomy": {
            "template": f"../tpl-{template}_desc-brain_T1w.nii.gz",
            "xfm": f"sub-{label}_ses-1_from-T1w_to-{template}_mode-image_xfm.nii.gz",
            "max_displacement_mm": ANATOMY_DISPLACEMENT_MM,
            "rigid_ras": pair.true_affine.round(8).tolist(),
        },
        "atrophy": {
            "region": f"sphere around {site}",
            "centre_template_mm": [float(c) for c in centre_mm],
            "radius_mm": radius_mm,
            "fade_to_mm": 2 * radius_mm,
            "sessions": atrophy,
        },
    }
    return DemoParticipant(label, images, pair.fixed, pair.true_displacement, displacements, truth)


def _noisy(image: Image, std: float, rng: np.random.Generator) -> Image:
    """``image`` with Gaussian noise of ``std`` inside its support (non-zero voxels), clipped at 0."""
    noise = rng.normal(0.0, std, image.data.shape) * (image.data > 0)
    return image.with_data(np.maximum(image.data + noise, 0.0).astype(np.float32))


def write_demo_dataset(out_dir: Path, *, participants: int = 3, sessions: int = 2, resolution_mm: float = 3.0,
                       atrophy_percent: float = 5.0, seed: int = 0) -> Path:
    """Write the demo BIDS dataset into ``out_dir`` (absent or empty; see the module docstring); returns it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "exists and is not empty")
    if participants < 1 or sessions < 1 or resolution_mm <= 0:
        raise ValueError("participants and sessions must be at least 1 and the resolution positive")
    if not 0.0 <= (sessions - 1) * atrophy_percent < 100.0:
        raise ValueError(f"an atrophy of {atrophy_percent} % per session over {sessions} sessions is not a volume loss")
    seeds = [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(participants)]
    labels = [f"{n:02d}" for n in range(1, participants + 1)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(6)}.tmp"
    staging.mkdir()
    try:
        for label, participant_seed in zip(labels, seeds):
            participant = make_participant(label, sessions=sessions, resolution_mm=resolution_mm,
                                           atrophy_percent=atrophy_percent, seed=participant_seed)
            participant.write(staging)
        # the same template brain for every participant
        save_image(participant.template, staging / "sourcedata" / "truth" / f"tpl-{TEMPLATE}_desc-brain_T1w.nii.gz")
        _write_json(staging / "dataset_description.json", _description())
        _write_text(staging / "README", _readme(participants, sessions, resolution_mm, atrophy_percent, seed))
        _write_text(staging / "participants.tsv",
                    "participant_id\tseed\n" + "".join(f"sub-{label}\t{s}\n" for label, s in zip(labels, seeds)))
        _write_json(staging / "participants.json", {
            "participant_id": {"Description": "Participant label"},
            "seed": {"Description": "Random seed of the participant's anatomy, position, intensities and noise"},
        })
        staging.replace(out_dir)  # an empty out_dir is replaced too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _description() -> dict:
    return {
        "Name": "rwcflow demo: MNI152 brains with a simulated left hippocampal atrophy",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "Derived from the MNI ICBM152 2009a template, under its permissive licence (see README)",
        "Authors": ["rwcflow developers"],
        "HowToAcknowledge": (
            "These synthetic images are deformed copies of the MNI ICBM152 2009a nonlinear symmetric template "
            "(McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University; as shipped "
            "in nilearn). Cite: " + "; ".join(MNI_REFERENCES)),
        "ReferencesAndLinks": ["https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009", *MNI_REFERENCES],
        "GeneratedBy": [{"Name": PROG, "Version": __version__,
                         "Description": "Synthetic longitudinal T1w images with a known local atrophy"}],
    }


def _readme(participants: int, sessions: int, resolution_mm: float, atrophy_percent: float, seed: int) -> str:
    command = (f"{PROG} OUT --participants {participants} --sessions {sessions} --resolution {resolution_mm:g} "
               f"--atrophy {atrophy_percent:g} --seed {seed}")
    return f"""# rwcflow demo dataset

Synthetic T1w images for trying rwcflow's BIDS App, written by `{command}` (rwcflow {__version__}).
{participants} participant(s) x {sessions} session(s), {resolution_mm:g} mm voxels, skull-stripped.

Each participant is the MNI ICBM152 2009a template brain deformed by its own known random smooth field
(up to {ANATOMY_DISPLACEMENT_MM:g} mm), moved by a small rigid transform and given an intensity change.
Each later session is session 1 with a simulated local atrophy around the left hippocampus (a sphere of
{ATROPHY_RADIUS_MM:g} mm radius around the template's MNI point {LEFT_HIPPOCAMPUS_MNI_MM}, shrunk uniformly by
{atrophy_percent:g} % of its volume per session, fading to no change at twice the radius; cubic-spline
resampling), then a tiny rigid repositioning. Every session has its own Gaussian noise inside the brain
(that of a 1 mm scan with {100 * NOISE_FRACTION_1MM:g} % of the brain's 99th intensity percentile, averaged
over the voxel's volume).

## Ground truth: sourcedata/truth/

- `tpl-{TEMPLATE}_desc-brain_T1w.nii.gz`: the template brain on the grid the anatomy fields refer to.
- `sub-<label>/sub-<label>_ses-1_from-T1w_to-{TEMPLATE}_mode-image_xfm.nii.gz`: ITK/ANTs displacement
  field on the template grid, mapping template points to session-1 points (it resamples session 1 onto
  the template).
- `sub-<label>/sub-<label>_from-ses1_to-ses<k>_mode-image_xfm.nii.gz`: displacement field on session k's
  grid, mapping its points to session-1 points: session 1 resampled through it is session k before noise.
- `sub-<label>/sub-<label>_truth.json`: the seed, the noise's standard deviation and the intensity gain;
  `anatomy.rigid_ras`, the rigid move (template world to session-1 world, after the deformation); and
  per session (`atrophy.sessions`) the sphere's centre in that session's world coordinates (RAS mm), the
  true volume change of the tissue inside it relative to session 1 (`volume_change_percent`) and the
  session's repositioning (`rigid_from_ses1_ras`, session-1 world to session world). The sphere has
  `atrophy.radius_mm`; inside it the Jacobian determinant of the session's field is exactly
  1 / (1 + volume_change_percent / 100).

Apply a field with ANTs: `antsApplyTransforms -d 3 -i sub-01_ses-1_T1w.nii.gz -r sub-01_ses-2_T1w.nii.gz
-t sub-01_from-ses1_to-ses2_mode-image_xfm.nii.gz -o ses-1_on_ses-2.nii.gz`.

## Licence of the template

The MNI ICBM152 2009a template (https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009):

{MNI_NOTICE}

References:

{chr(10).join(f"- {reference}" for reference in MNI_REFERENCES)}
"""


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_json(path: Path, content: dict) -> Path:
    return _write_text(path, json.dumps(content, indent=2) + "\n")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (absent or empty)")
    parser.add_argument("--participants", type=_positive(int), default=3, help="number of participants (default 3)")
    parser.add_argument("--sessions", type=_positive(int), default=2, help="sessions per participant (default 2)")
    parser.add_argument("--resolution", type=_positive(float), default=3.0, help="voxel size in mm (default 3)")
    parser.add_argument("--atrophy", type=float, default=5.0,
                        help="volume lost by the hippocampal sphere per session, in %% (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        out = write_demo_dataset(args.out_dir, participants=args.participants, sessions=args.sessions,
                                 resolution_mm=args.resolution, atrophy_percent=args.atrophy, seed=args.seed)
    except (RwcflowError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {args.participants} participant(s) x {args.sessions} session(s); truth in sourcedata/truth/")
    return 0
