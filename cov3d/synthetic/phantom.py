"""Chest-CT phantoms rendered in Hounsfield units (HU), with COVID-19 lesions of controlled extent.

Geometry: a volume is ``(D, S, S)`` = (slices from apex to base, rows anterior to posterior, columns
patient-right to patient-left, radiological convention). In-plane, the scanner's field of view spans
``[-1, 1]`` units (1 unit = ``MM_PER_UNIT`` mm); along the depth axis the scan always covers
``Z_EXTENT`` units, whatever its slice count, so a short scan samples the same chest more coarsely.
Anatomy is placed in a patient frame normalised by the body's half-width and half-depth, so it follows
the random patient size, position and rotation. Random smooth fields (Gaussian-kernel interpolation of
coarse white noise, separable, hence fast) give vessels, textures and lesions.

The proportions (body, lungs, fat, the foam mattress and table under the patient, a reconstruction
disc in ``FOV_DISC_SHARE`` of the scans only) were set so that the middle slices, mapped to grey
levels by the calibrated window (``cov3d.window.DEFAULT_WINDOW``), fall into
COV19-CT-DB's grey-level bands (``scripts/intensity_bands.py``; docs/intensities.md).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cov3d.dataset.intensity import HEALTHY_LUNG_HU

# Hounsfield units of tissues (typical values, e.g. Radiopaedia "Hounsfield unit").
HU_OUTSIDE_FOV = -2000.0  # padding outside the reconstruction circle, renders black
HU_AIR = -1000.0
HU_LUNG_RANGE = (HEALTHY_LUNG_HU - 20.0, HEALTHY_LUNG_HU + 40.0)  # mean lung parenchyma per scan (real 8 mm series: median -810 HU)
HU_PAD = (-800.0, -600.0)  # foam mattress between patient and table
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_BLOOD = 45.0  # unenhanced blood in vessels, heart and aorta
HU_CANCELLOUS_BONE = 250.0
HU_BONE = 700.0
HU_DISC = 80.0
HU_TABLE = 150.0
HU_TABLE_CORE = (-850.0, -700.0)  # foam core of the table
HU_GGO = (-450.0, -300.0)  # ground-glass opacity, drawn per scan
HU_CONSOLIDATION = (-10.0, 40.0)
HU_NODULE = (-40.0, 60.0)

# Body size relative to the field of view, fitted to real chest CT (the body spans ~90 % of the
# image width, its depth ~60 % of the width) and to COV19-CT-DB's grey-level bands
# (cov3d.dataset.intensity, docs/intensities.md).
BODY_HALF_WIDTH = (0.88, 0.99)  # units (the field of view is [-1, 1])
BODY_DEPTH_RATIO = (0.64, 0.76)  # half-depth / half-width
LUNG_HALF_WIDTH = (0.35, 0.4)  # lung ellipse half-axes in the body frame (half-width = 1)
LUNG_HALF_DEPTH = (0.66, 0.74)
BODY_EXPONENT = 2.6  # superellipse: a chest section is squarer than an ellipse
FAT_SHELL = (0.08, 0.2)  # subcutaneous fat, share of the body radius
FOV_DISC_SHARE = 0.3
"""Share of scans whose pixels outside the reconstruction circle are padding (black), as some
scanners store them; the others show air up to the image edge."""

TABLE_THICKNESS = (0.1, 0.18)  # units
TABLE_SHELL = 0.015
TABLE_CURVE = 0.08  # the table's edges rise by this much (units) at |x| = 0.9

MM_PER_UNIT = 175.0  # the in-plane field of view is 2 units = 350 mm
Z_EXTENT = 1.7  # units covered along the depth axis (about 300 mm of chest)

# Severity = fraction of lung volume involved: mild < 25 %, moderate 25-50 %, severe 50-75 %,
# critical > 75 % (Kollias et al. 2022, AI-MIA: categories by pulmonary parenchymal involvement).
SEVERITY_BANDS = {1: (0.0, 0.25), 2: (0.25, 0.5), 3: (0.5, 0.75), 4: (0.75, 1.0)}
# Target fractions are drawn inside each band with margins, so neighbouring classes stay separable
# and the smallest lesions remain visible after downsampling to 64x64.
TARGET_BANDS = {1: (0.1, 0.21), 2: (0.29, 0.46), 3: (0.54, 0.71), 4: (0.79, 0.93)}
# Share of the involved volume that is consolidation rather than ground glass, per severity.
CONSOLIDATION_SHARE = {1: 0.0, 2: 0.05, 3: 0.2, 4: 0.35}

LESION_LENGTH = 0.13  # correlation length (units) of the lesion field: patches of a few cm
VESSEL_LENGTH = 0.04  # correlation length of the two fields whose common zero set draws vessels
TEXTURE_LENGTH = 0.06
LESION_SOFTNESS = 0.4  # field units over which a lesion edge ramps from faint to full opacity
N_RIBS = 8  # rib sections around an axial slice (about 4 a side)
RIB_CYCLES = 10  # ribs met along the covered depth at the side of the chest (~30 mm apart)
N_VERTEBRAE = 12  # thoracic vertebrae over the covered depth


@dataclass
class Phantom:
    """A rendered scan: ``hu`` (D, S, S) float32, ``lung`` and ``lesion`` (D, S, S) bool masks, and
    ``fraction``, the measured share of lung voxels inside lesions."""

    hu: np.ndarray
    lung: np.ndarray
    lesion: np.ndarray
    fraction: float


def pixel_centres(n: int, extent: float) -> np.ndarray:
    """Centres of ``n`` pixels tiling ``[-extent, extent]``, shape (n,) float32."""
    return (((np.arange(n) + 0.5) / n) * 2.0 - 1.0).astype(np.float32) * extent


def _kernel_matrix(coords: np.ndarray, length: float) -> np.ndarray:
    """Gaussian weights (n, k) from knots spaced ``length`` apart to ``coords``; each row has unit norm."""
    knots = np.arange(coords.min() - 2 * length, coords.max() + 2 * length + 1e-6, length)
    distance = (coords[:, None] - knots[None, :].astype(np.float32)) / length
    weights = np.exp(-0.5 * distance * distance)
    return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, z: np.ndarray, y: np.ndarray, x: np.ndarray, length: float) -> np.ndarray:
    """Stationary Gaussian random field with unit variance and correlation ``length``, shape (len(z), len(y), len(x))."""
    mz, my, mx = (_kernel_matrix(c, length) for c in (z, y, x))
    coarse = rng.standard_normal((mz.shape[1], my.shape[1], mx.shape[1]), dtype=np.float32)
    field = np.tensordot(mz, coarse, axes=1)  # (D, ky, kx): depth first, usually the fewest samples
    return np.matmul(my, field @ mx.T)


def _ellipse(p: np.ndarray, q: np.ndarray, centre: tuple[float, float], axes: tuple) -> np.ndarray:
    """Squared normalised elliptical radius about ``centre``; < 1 inside. Broadcasts over its inputs."""
    return ((p - centre[0]) / axes[0]) ** 2 + ((q - centre[1]) / axes[1]) ** 2


def _draw_lesions(rng: np.random.Generator, score: np.ndarray, lung_sides: list[np.ndarray], fraction: float,
                  severity: int, hu: np.ndarray, lung_hu: np.ndarray) -> np.ndarray:
    """Threshold ``score`` (D, S, S) in each lung mask at the quantile that involves ``fraction`` of it;
    paint GGO and consolidation into ``hu`` (D, S, S) in place. Returns the lesion mask (D, S, S) bool."""
    lesion = np.zeros_like(lung_sides[0])
    consolidation_share = CONSOLIDATION_SHARE[severity] * rng.uniform(0.7, 1.3)
    ggo_hu = rng.uniform(*HU_GGO) + 40.0 * score
    consolidation_hu = rng.uniform(*HU_CONSOLIDATION)
    for side in lung_sides:
        values = score[side]
        if values.size == 0:
            continue
        threshold = float(np.quantile(values, 1.0 - fraction))
        mask = side & (score > threshold)
        lesion |= mask
        opacity = 0.6 + 0.4 * np.clip((score - threshold) / LESION_SOFTNESS, 0.0, 1.0)
        hu[mask] = (lung_hu * (1 - opacity) + ggo_hu * opacity)[mask]
        if consolidation_share > 0 and mask.any():
            dense_threshold = float(np.quantile(score[mask], 1.0 - consolidation_share))
            dense = mask & (score > dense_threshold)
            hu[dense] = consolidation_hu
    return lesion


def render_phantom(rng: np.random.Generator, *, depth: int, slice_size: int, has_covid: bool, severity: int) -> Phantom:
    """Render one chest CT of shape (depth, slice_size, slice_size) in HU.

    ``severity`` 1..4 draws the involved fraction inside that category's band; 0 with ``has_covid``
    draws a category at random first; negatives (``has_covid`` False) must have severity 0.
    """
    if not 0 <= severity <= 4 or (severity and not has_covid):
        raise ValueError(f"severity must be 0..4 and 0 for negatives, got {severity} (has_covid={has_covid})")
    if depth < 1 or slice_size < 8:
        raise ValueError(f"need depth >= 1 and slice_size >= 8, got {depth} and {slice_size}")
    if has_covid and severity == 0:
        severity = int(rng.integers(1, 5))
    z = (np.arange(depth, dtype=np.float32) + 0.5) / depth  # 0 at the top of the scan, 1 at the bottom
    zu = z * Z_EXTENT
    xy = pixel_centres(slice_size, 1.0)
    t3 = z[:, None, None]

    # Patient size, position and rotation; body half-width grows slightly towards the base.
    half_width = rng.uniform(*BODY_HALF_WIDTH)
    half_depth = half_width * rng.uniform(*BODY_DEPTH_RATIO)
    angle = float(np.deg2rad(rng.uniform(-6, 6)))
    shift = rng.uniform([-0.04, -0.1], [0.04, 0.02]).astype(np.float32)
    xx, yy = xy[None, :] - shift[0], xy[:, None] - shift[1]
    p_u = np.cos(angle) * xx + np.sin(angle) * yy  # (S, S) units, lateral towards patient left
    q_u = -np.sin(angle) * xx + np.cos(angle) * yy  # (S, S) units, anterior (<0) to posterior (>0)
    p2, q2 = p_u / half_width, q_u / half_depth
    grow = (0.92 + 0.1 * t3).astype(np.float32)
    p, q = p2[None] / grow, q2[None] / grow  # (D, S, S) normalised patient frame

    # Body: superellipse, flatter at the back; subcutaneous fat shell; thoracic cavity inside the ribs.
    radius2 = (np.abs(p2) ** BODY_EXPONENT + np.abs(q2 * np.where(q2 > 0, 1.08, 1.0)) ** BODY_EXPONENT) ** (1 / BODY_EXPONENT)
    radius = radius2[None] / grow
    fat = rng.uniform(*FAT_SHELL)
    hu = np.full(radius.shape, HU_SOFT_TISSUE, dtype=np.float32)
    hu[radius > 1 - fat] = HU_FAT
    hu[radius > 1] = HU_AIR
    # Foam mattress under the back, on a curved table: a foam core between two thin dense shells.
    outside = radius > 1
    table_top = half_depth * 1.02 + rng.uniform(0.03, 0.07) - TABLE_CURVE * (xx / 0.9) ** 2  # (S, S)
    pad = (yy > 0.7 * half_depth) & (yy < table_top) & (np.abs(xx) < rng.uniform(0.6, 0.8) * half_width)
    hu[pad[None] & outside] = rng.uniform(*HU_PAD)
    thickness = rng.uniform(*TABLE_THICKNESS)
    table = (yy > table_top) & (yy < table_top + thickness) & (np.abs(xy[None, :]) < 0.95)
    shell = table & ((yy < table_top + TABLE_SHELL) | (yy > table_top + thickness - TABLE_SHELL))
    hu[table[None] & outside] = rng.uniform(*HU_TABLE_CORE)
    hu[shell[None] & outside] = HU_TABLE
    cavity = radius < 1 - fat - 0.11
    theta = N_RIBS * np.arctan2(q2, p2)
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * RIB_CYCLES * t3  # ribs run obliquely down the chest
    rib_wave = np.cos(theta)[None] * np.cos(phase) - np.sin(theta)[None] * np.sin(phase)
    ribs = (radius > 1 - fat - 0.1) & (radius < 1 - fat - 0.045) & (rib_wave > 0.5) & (np.abs(p2) > 0.18)[None]
    hu[ribs] = HU_BONE

    # Spine: vertebral body with cortex and discs, canal, arch; descending aorta beside it.
    vertebra = half_width * 0.12
    spine_q = 0.36 * half_depth
    d_body = np.hypot(p_u, q_u - spine_q)  # (S, S)
    in_disc = ((t3 * N_VERTEBRAE + rng.uniform()) % 1.0) < 0.15
    hu[:, d_body < vertebra] = HU_CANCELLOUS_BONE
    hu[:, (d_body < vertebra) & (d_body > 0.8 * vertebra)] = HU_BONE
    hu[(d_body < vertebra)[None] & in_disc] = HU_DISC
    canal_q = spine_q + 1.55 * vertebra
    d_canal = np.hypot(p_u, q_u - canal_q)
    arch = ((d_canal > 0.45 * vertebra) & (d_canal < 0.8 * vertebra)) | (
        (np.abs(p_u) < 0.15 * vertebra) & (q_u > canal_q) & (q_u < canal_q + 1.1 * vertebra))
    hu[:, arch] = HU_BONE
    hu[:, d_canal < 0.45 * vertebra] = HU_SOFT_TISSUE
    aorta = (np.hypot(p_u - 1.3 * vertebra, q_u - spine_q + 1.1 * vertebra) < 0.6 * vertebra)[None] & (t3 > 0.2)
    hu[aorta] = HU_BLOOD

    # Lungs: ellipses tapering to the apex, hollowed by the diaphragm domes at the base, carved by the heart.
    apex, base = rng.uniform(0.02, 0.1), rng.uniform(0.84, 0.96)
    t_rel = (t3 - apex) / (base - apex)
    taper = np.sqrt(np.clip(t_rel / 0.3, 0, 1)) * (t_rel <= 1)
    heart_size = np.sqrt(np.clip(np.sin(np.pi * (t_rel - 0.35) / 0.6), 0, 1))  # rests on the diaphragm
    heart = _ellipse(p, q, (0.1, -0.18), (0.36 * heart_size + 1e-6, 0.34 * heart_size + 1e-6))
    trachea = (np.hypot(p_u, q_u - spine_q + 1.6 * vertebra) < 0.5 * vertebra)[None] & (t3 < 0.45)
    lung_hu = np.float32(rng.uniform(*HU_LUNG_RANGE)) + 60.0 * q
    lung_hu += 12.0 * smooth_field(rng, zu, xy, xy, TEXTURE_LENGTH)
    sides, radii = [], []
    for sign, dome_lift in ((-1.0, 0.04), (1.0, 0.0)):  # patient right (liver side, higher dome), left
        centre = (sign * rng.uniform(0.42, 0.47), rng.uniform(-0.06, 0.02))
        axes = (rng.uniform(*LUNG_HALF_WIDTH) * taper + 1e-6, rng.uniform(*LUNG_HALF_DEPTH) * (0.5 + 0.5 * taper) + 1e-6)
        ellipse = _ellipse(p, q, centre, axes)
        dome = np.clip((t_rel - 0.72 + dome_lift) / 0.28, 0, 1) ** 0.6 * 0.92
        side = (ellipse < 1) & (ellipse > dome**2) & cavity & (np.abs(p) > 0.09) & (heart > 1.15)
        side &= (d_body > 1.35 * vertebra)[None] & ~aorta
        sides.append(side)
        radii.append(np.sqrt(ellipse))
    lung = sides[0] | sides[1]
    lung_radius = np.where(sides[0], radii[0], radii[1])
    hu[heart < 1.15] = HU_FAT
    hu[heart < 1] = HU_BLOOD
    hu = np.where(lung, lung_hu, hu)
    hu[trachea] = HU_AIR

    # Dependent atelectasis (sometimes) and nodules: distractors present in negatives and positives.
    if rng.random() < 0.35:
        band = lung & (lung_radius > rng.uniform(0.88, 0.94)) & (q > 0.25)
        hu[band] += rng.uniform(100, 200)
    lesion = np.zeros_like(lung)
    if has_covid:
        score = smooth_field(rng, zu, xy, xy, LESION_LENGTH)
        score += rng.uniform(0.3, 0.8) * lung_radius**2 + rng.uniform(0.1, 0.5) * q + rng.uniform(0, 0.4) * t_rel
        fraction_target = rng.uniform(*TARGET_BANDS[severity])
        lesion = _draw_lesions(rng, score, sides, fraction_target, severity, hu, lung_hu)
    wall_hu = np.where(lesion, hu, lung_hu)
    width = rng.uniform(0.18, 0.3) * (1.6 - np.clip(lung_radius, 0, 1))
    spread = np.maximum(np.abs(smooth_field(rng, zu, xy, xy, VESSEL_LENGTH)),
                        np.abs(smooth_field(rng, zu, xy, xy, VESSEL_LENGTH)))
    vessel = np.clip(1.6 * (1 - spread / width), 0, 1)
    hu = np.where(lung, np.maximum(hu, wall_hu + vessel * (HU_BLOOD - wall_hu)), hu)
    lung_index = np.flatnonzero(lung)
    for _ in range(min(int(rng.poisson(1.5)), 5) if lung_index.size else 0):
        k, i, j = np.unravel_index(rng.choice(lung_index), lung.shape)
        size = rng.uniform(0.015, 0.04)
        d2 = (zu[:, None, None] - zu[k]) ** 2 + (xy[None, :, None] - xy[i]) ** 2 + (xy[None, None, :] - xy[j]) ** 2
        hu[lung & (d2 < size**2)] = rng.uniform(*HU_NODULE)

    # Acquisition: partial-volume blur, noise, gain/offset drift, reconstruction circle.
    blur = rng.uniform(0.003, 0.007) * slice_size
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, blur, blur))
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(8.0, 25.0))
    hu = hu * np.float32(rng.uniform(0.98, 1.02)) + np.float32(rng.uniform(-10, 10))
    if rng.random() < FOV_DISC_SHARE:
        hu[:, xy[None, :] ** 2 + xy[:, None] ** 2 > 1.0] = HU_OUTSIDE_FOV
    fraction = float(lesion.sum() / lung.sum()) if lung.any() else 0.0
    return Phantom(hu=hu, lung=lung, lesion=lesion, fraction=fraction)
