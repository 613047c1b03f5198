"""A synthetic abdominal CT phantom, written as real NIfTI in MSD layout, one folder per site.

Not patient data: a vectorised geometric phantom with CT-like Hounsfield units. Per patient:
air (-1000) around an elliptic body with subcutaneous fat (~-100), abdominal wall and
paraspinal muscle (~50), visceral soft tissue, a vertebral column (cortical ~900, cancellous
~250, discs, spinal canal), aorta and inferior vena cava, kidneys (~30), spleen, a gas-filled
stomach, the couch, and a liver (~60 HU; right side, label 1) whose ellipsoidal shape is deformed
by smooth random harmonics, with a left lobe, enhancing hepatic vessels and 0-3 hypodense
lesions (~20-30 HU, label 2). Size and position vary per patient.

Sites differ like scanners do (non-IID federation): field of view and so in-plane spacing,
slice thickness, an HU calibration offset, noise level, blur, contrast timing, and the voxel
order stored in the file (``RAS``, ``LPS`` as DICOM-derived converters write it, ``RAI`` with
slices stored head to feet). The voxel data is reoriented together with the affine, so
``nibabel.as_closest_canonical`` brings every site into the same anatomical orientation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {"0": "background", "1": "liver", "2": "tumour"}


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and protocol differ. Spacing follows from FOV / shape."""

    orientation: str  # axis codes of the stored voxel order, e.g. "RAS", "LPS"
    fov_mm: float  # in-plane field of view (both axes)
    z_coverage_mm: float  # craniocaudal coverage of the scan
    hu_offset: float  # calibration offset added to every voxel
    noise_hu: float  # std of the Gaussian quantum noise
    blur_mm: float  # point-spread function std
    liver_hu: float  # parenchyma (contrast timing differs between sites)
    vessel_hu: float  # enhancing hepatic/portal vessels


PROFILES = (
    ScannerProfile("RAS", 380.0, 150.0, 0.0, 12.0, 1.5, 60.0, 150.0),
    ScannerProfile("LPS", 420.0, 220.0, 20.0, 22.0, 2.5, 55.0, 110.0),
    ScannerProfile("RAI", 350.0, 130.0, -15.0, 16.0, 1.0, 65.0, 170.0),
)


def site_name(i: int) -> str:
    return f"site{chr(ord('A') + i)}" if i < 26 else f"site{i + 1:03d}"


def site_profile(i: int, seed: int) -> ScannerProfile:
    """The three first sites use fixed, distinct profiles; further sites are drawn at random."""
    if i < len(PROFILES):
        return PROFILES[i]
    rng = np.random.default_rng([seed, i, 7])
    return ScannerProfile(
        orientation=str(rng.choice(["RAS", "LPS", "RAI", "LAS", "RPS"])),
        fov_mm=float(rng.uniform(340, 440)),
        z_coverage_mm=float(rng.uniform(120, 240)),
        hu_offset=float(rng.uniform(-25, 25)),
        noise_hu=float(rng.uniform(8, 30)),
        blur_mm=float(rng.uniform(0.8, 2.5)),
        liver_hu=float(rng.uniform(52, 68)),
        vessel_hu=float(rng.uniform(100, 180)),
    )


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise [shape] rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Normalised squared distance ((x-cx)/rx)^2 + ... on a broadcast grid (<= 1 inside)."""
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )


def _segment_distance(x, y, z, p0, p1) -> np.ndarray:
    """Distance (mm) from every grid point to the segment p0-p1."""
    d = np.subtract(p1, p0)
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(
        (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    )


def phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], profile: ScannerProfile, rng
) -> tuple[np.ndarray, np.ndarray]:
    """One patient on a canonical RAS+ grid: (HU int16 [X, Y, Z], label uint8 [X, Y, Z]).

    Coordinates are mm from the grid centre: +x patient's right, +y anterior, +z superior.
    """
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
    full = np.zeros(shape, np.float32)
    u = rng.uniform

    # Body, fat, wall muscle; the body's outline changes a little along z.
    a, b = u(128, 158), u(92, 115)
    yc = u(-5, 15)
    scale = 1 + 0.04 * np.sin(z / u(40, 80) + u(0, 6))
    body = ((x / (a * scale)) ** 2 + ((y - yc) / (b * scale)) ** 2) <= 1
    fat = u(8, 28)
    cavity = ((x / (a * scale - fat)) ** 2 + ((y - yc) / (b * scale - fat)) ** 2) <= 1
    inner = ((x / (a * scale - fat - 10)) ** 2 + ((y - yc) / (b * scale - fat - 10)) ** 2) <= 1
    texture = _smooth_noise(rng, shape, [3.0 / s for s in spacing])  # unit std, ~3 mm grain
    hu = np.where(body, -100.0 + 8 * texture, -1000.0) + full
    hu = np.where(cavity, 50.0 + 4 * texture, hu)  # abdominal wall muscle
    # Visceral compartment: bowel loops (~30 HU) in mesenteric fat (~-90 HU).
    loops = _smooth_noise(rng, shape, [7.0 / s for s in spacing])
    hu = np.where(inner, np.where(loops > u(-0.6, 0.0), 30.0 + 6 * texture, -90.0), hu)

    # Ribs: oblique, so they cut each axial slice as short arcs of the wall (upper abdomen).
    ring = (x / (a * scale - fat - 5)) ** 2 + ((y - yc) / (b * scale - fat - 5)) ** 2
    angle = np.arctan2((y - yc) / b, x / a)
    rib_band = (np.abs(ring - 1) < 0.07) & (np.abs(np.sin(angle)) < 0.85)
    rib_gap = np.cos(angle * u(6, 9) + z / u(8, 14) + u(0, 6)) > 0.55
    hu = np.where(rib_band & rib_gap & (z > u(-60, -20)), 650.0, hu)

    # Couch under the patient.
    couch = (np.abs(y - (yc - b - 18)) < 4) & (np.abs(x) < 190) & ~body
    hu = np.where(couch, -350.0, hu)

    # Spine and paraspinal muscles (posterior midline).
    yv = yc - (b - fat) + 45
    vert = _ellipsoid(x, y, 0 * z, (0, yv, 0), (21, 17, 1))
    disc = (np.mod(z + u(0, 30), 30) < 5) & (vert <= 1)
    hu = np.where(_ellipsoid(x, y, 0 * z, (35, yv - 32, 0), (22, 18, 1)) <= 1, 50.0, hu)
    hu = np.where(_ellipsoid(x, y, 0 * z, (-35, yv - 32, 0), (22, 18, 1)) <= 1, 50.0, hu)
    hu = np.where(vert <= 1, 900.0, hu)
    hu = np.where(vert <= 0.7, 250.0, hu)
    hu = np.where(disc, 85.0, hu)
    canal = _ellipsoid(x, y, 0 * z, (0, yv - 30, 0), (14, 13, 1))
    hu = np.where(canal <= 1, 700.0, hu)
    hu = np.where(canal <= 0.45, 15.0, hu)

    # Great vessels.
    hu = np.where(
        _ellipsoid(x, y, 0 * z, (-16, yv + 30, 0), (11, 11, 1)) <= 1, profile.vessel_hu + 20, hu
    )
    ivc = _ellipsoid(x, y, 0 * z, (24, yv + 28, 0), (12, 9, 1)) <= 1
    hu = np.where(ivc, profile.vessel_hu - 20, hu)

    # Liver geometry first: other organs sit around it.
    zc = u(-30, 30)
    centre = np.array([u(45, 62), yc + u(0, 20), zc])
    radii = np.array([u(60, 78), u(70, 88), u(65, 85)])
    d = _ellipsoid(x, y, z, centre, radii)
    norm = np.sqrt(np.maximum(d, 1e-6))
    bump = np.zeros_like(d)
    for _ in range(5):  # smooth random shape: low-order harmonics over the direction
        k = rng.normal(size=3) * u(1.5, 3.5)
        bump += u(0.03, 0.08) * np.cos(
            k[0] * (x - centre[0]) / radii[0] / norm
            + k[1] * (y - centre[1]) / radii[1] / norm
            + k[2] * (z - centre[2]) / radii[2] / norm
            + u(0, 2 * np.pi)
        )
    liver = d <= (1 + bump) ** 2
    left_lobe = _ellipsoid(
        x,
        y,
        z,
        (u(-5, 20), centre[1] + u(20, 35), zc + u(5, 25)),
        (u(40, 60), u(25, 35), u(28, 40)),
    )
    liver |= left_lobe <= 1
    posterior = _ellipsoid(x, y, 0 * z, (0, yv - 10, 0), (60, 45, 1)) <= 1
    liver &= inner & ~posterior & ~ivc

    # Kidneys, spleen, stomach (painted before the liver, which wins where they touch).
    for side, dz in ((1, -u(55, 75)), (-1, -u(40, 60))):
        kidney = (
            _ellipsoid(x, y, z, (side * u(60, 72), yv + u(5, 15), zc + dz), (27, 22, u(45, 55)))
            <= 1
        )
        hu = np.where(kidney & inner, 30.0 + 3 * texture, hu)
    spleen = (
        _ellipsoid(x, y, z, (-u(75, 90), yv + u(25, 40), zc + u(0, 20)), (28, 45, u(45, 55))) <= 1
    )
    hu = np.where(spleen & inner, 48.0 + 3 * texture, hu)
    stomach_c = (-u(30, 50), yc + u(25, 45), zc + u(10, 30))
    stomach = _ellipsoid(x, y, z, stomach_c, (u(35, 45), u(25, 32), u(35, 45))) <= 1
    hu = np.where(stomach & inner, 15.0, hu)
    hu = np.where(stomach & inner & (y > stomach_c[1] + 12), -850.0, hu)  # gas cap (supine)

    # Liver parenchyma, vessels, lesions.
    hu = np.where(liver, profile.liver_hu + 3 * texture, hu)
    label = liver.astype(np.uint8)
    hilum = centre + np.array([-25.0, -10.0, -15.0])
    for _ in range(int(rng.integers(3, 6))):
        tip = centre + rng.normal(size=3) * radii * 0.55
        vessel = (_segment_distance(x, y, z, hilum, tip) <= u(2.0, 4.0)) & liver
        hu = np.where(vessel, profile.vessel_hu, hu)
    inside = np.argwhere(d <= 0.5)
    for _ in range(int(rng.integers(0, 4)) if inside.size else 0):
        c = (
            np.array([x.ravel()[0], y.ravel()[0], z.ravel()[0]])
            + inside[rng.integers(len(inside))] * spacing
        )
        r = u(5, 18) * np.array([1.0, u(0.8, 1.2), u(0.8, 1.2)])
        dist = np.sqrt(_ellipsoid(x, y, z, c, r))
        weight = np.clip((1.15 - dist) / 0.3, 0, 1) * liver  # soft edge over ~30 % of the radius
        hu = hu * (1 - weight) + u(20, 30) * weight
        label[(dist <= 1) & liver] = 2

    # Scanner: blur, calibration offset, quantum noise.
    sigma = [profile.blur_mm / s for s in spacing]
    hu = ndimage.gaussian_filter(hu, sigma) + profile.hu_offset
    hu = hu + rng.normal(0, profile.noise_hu, shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label


def _stored(
    data: np.ndarray, canonical_affine: np.ndarray, orientation: str, dtype
) -> nib.Nifti1Image:
    """A NIfTI image whose voxel order is ``orientation``, same anatomy as the RAS+ input."""
    img = nib.Nifti1Image(data.astype(dtype), canonical_affine)
    to = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(orientation))
    )
    out = img.as_reoriented(to)
    out = nib.Nifti1Image(np.ascontiguousarray(np.asanyarray(out.dataobj)), out.affine)
    out.set_data_dtype(dtype)
    out.set_qform(out.affine, code=1)
    out.set_sform(out.affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    return out


def write_site(
    site_dir: Path,
    site: str,
    profile: ScannerProfile,
    volumes: int,
    seed: int,
    site_index: int,
    shape,
) -> Path:
    """One site folder in MSD layout with ``volumes`` synthetic patients."""
    (site_dir / "imagesTr").mkdir(parents=True)
    (site_dir / "labelsTr").mkdir()
    spacing = (
        profile.fov_mm / shape[0],
        profile.fov_mm / shape[1],
        profile.z_coverage_mm / shape[2],
    )
    training = []
    for j in range(volumes):
        rng = np.random.default_rng([seed, site_index, j])
        hu, label = phantom(shape, spacing, profile, rng)
        origin = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing) + [0, 0, rng.uniform(-40, 40)]
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = origin
        case = f"{site}_case{j:03d}"
        nib.save(
            _stored(hu, affine, profile.orientation, np.int16),
            site_dir / "imagesTr" / f"{case}.nii.gz",
        )
        nib.save(
            _stored(label, affine, profile.orientation, np.uint8),
            site_dir / "labelsTr" / f"{case}.nii.gz",
        )
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    meta = {
        "name": f"tff_privseg synthetic abdomen, {site}",
        "description": (
            "Synthetic abdominal CT phantom (not patient data) generated by tff_privseg.data.synth "
            f"with seed {seed}. Label 1 liver, 2 tumour (inside the liver)."
        ),
        "reference": "tff_privseg",
        "licence": "CC0 (generated)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS,
        "numTraining": volumes,
        "numTest": 0,
        "training": training,
        "test": [],
        "scanner": {
            **asdict(profile),
            "spacing_mm": [round(s, 4) for s in spacing],
            "shape": list(shape),
        },
    }
    (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return site_dir


def write_synthetic_dataset(
    out: str | Path,
    sites: int = 3,
    volumes_per_site: int = 10,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 48),
) -> list[Path]:
    """Write ``sites`` MSD site folders under ``out`` (created; may exist) and return them.

    Case ids are unique across sites (``siteA_case003``). Deterministic in ``seed``.
    """
    if sites < 1 or volumes_per_site < 1:
        raise ValueError("need at least one site and one volume per site")
    if min(shape) < 8:
        raise ValueError(f"shape {shape} is too small (min 8 voxels per axis)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        write_site(
            out / site_name(i),
            site_name(i),
            site_profile(i, seed),
            volumes_per_site,
            seed,
            i,
            tuple(shape),
        )
        for i in range(sites)
    ]
