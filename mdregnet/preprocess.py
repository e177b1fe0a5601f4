"""Preprocessing of raw T1 MRI for training: skull strip, normalise, affine to a template, crop.

    python -m mdregnet.preprocess --images ixi/T1 --labels ixi/labels --out work_data/ixi \
        [--masks DIR] [--template mni152|first|NIFTI [--template_mask NIFTI]] [--spacing 2] \
        [--shape 80,112,80] [--subjects FILE] [--workers 2] [--overwrite]

What the MDReg-Net paper got from FreeSurfer ("Image Datasets": skull stripping, intensity
normalisation, affine alignment, 1 mm, cropped to 176x192x176), done per subject by
`preprocess_subject`:

1. Skull stripping with a given brain mask (`--masks`, non-zero = brain) or else the label map
   (`labels > 0`; for IXI the DLMUSE parcellation `<ID>_T1_DLMUSE.nii.gz`). The mask is dilated by
   `mask_dilation` voxels (default 1, a 3x3x3 cross per step) before it is applied to the image, so
   that the partial-volume rim of the cortex that the parcellation shaves off at 2 mm stays in the
   image; the label map itself is never dilated.
2. Robust intensity normalisation inside the brain (`io.normalize_intensity`, 0.5 and 99.5
   percentiles to 0 and 1), float32 in [0, 1], background exactly 0.
3. Affine alignment of the skull-stripped image to a skull-stripped template with SimpleITK
   (`register_affine`): centred initialisation by image moments (centres of mass), then a
   12-parameter affine transform optimised by regular-step gradient descent on Mattes mutual
   information (or normalised correlation for images of one modality and one normalisation), at
   three resolutions (shrink factors 4, 2, 1; Gaussian smoothing 2, 1, 0 voxels). Why SimpleITK:
   it is a well-kept (Insight Software Consortium / Kitware) and pip-installable library with
   wheels for every platform, whose registration framework is ITK's own (the optimiser, metrics
   and multi-resolution scheme behind ANTs and elastix); antspyx would add a much larger and less
   portable dependency for the same affine step, and FreeSurfer is not pip-installable.
4. Resampling onto one target grid shared by every subject (`target_grid`): the template's axes
   reordered to the closest RAS orientation (a permutation and flips only; the DLMUSE/IXI images
   are PSR), voxel size `spacing` (default: the template's), `shape` voxels (each divisible by 16,
   the MDReg-Net down-sampling factor; default 80x96x80 for 2 mm, the paper uses 176x192x176 at
   1 mm) centred on the centre of the template brain's bounding box and snapped to the template's
   voxel centres. Images are resampled trilinearly, label maps by nearest neighbour, 0 outside.
   The log says how much of the template's field of view was padded or cropped on each axis, and
   a subject whose aligned brain touches the faces of the box (brain voxels cut) gets a warning.
   There is no anti-aliasing: choose a `spacing` close to the inputs' voxel size.
5. Outputs, written atomically by `io.save_volume` with the affine of the target grid:
   `<out>/images/<id>.nii.gz` (float32 in [0, 1]) and `<out>/labels/<id>.nii.gz` (uint16 on disk,
   int32 if a label does not fit). `<id>` is the image's file name without `.nii` / `.nii.gz`
   (`mdregnet.data.find_subjects` finds them again).

The template: by default (`--template mni152`) the ICBM 2009a nonlinear symmetric MNI152 T1
brain at 2 mm shipped in `mdregnet/assets` (from nilearn's bundled copy; see its README), so the
outputs live in MNI space on the grid the shipped models were trained on. `--template` can also be
any NIfTI: it must be skull-stripped (background exactly 0) unless `--template_mask` is given, and
it is normalised like the subjects. `--template first` takes the FIRST subject of the cohort
(sorted ids, or the first of `--subjects`; the next one if its files cannot be read), skull
stripped and normalised: every subject is affinely aligned to subject 1 and the output grid is
centred on subject 1's brain.

The command runs subjects in parallel processes (`--workers`, default min(2, CPUs)), logs one
line per subject with its time, the elapsed time and an ETA, skips subjects whose outputs exist
(unless `--overwrite`), reports each failure in one line naming the file and the error without
stopping the batch, prints a summary and exits with status 1 if any subject failed.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import time
from typing import Optional

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from absl import app, flags, logging

from mdregnet import assets, io

FLAGS = flags.FLAGS

DEFAULT_SHAPE = (80, 96, 80)
#: Each output size must be divisible by this (total down-sampling of the MDReg-Net networks).
SHAPE_DIVISOR = 16
METRICS = ("mattes", "correlation")
_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world (RAS) <-> ITK world (LPS)
_AXIS_NAMES = "RAS"


# ------------------------------------------------------------------------------------------------
# Template and target grid
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Template:
    """A skull-stripped, normalised template on its own grid (picklable: numpy only).

    Attributes:
        image: `(X, Y, Z)` float32 in [0, 1], 0 outside the brain.
        mask: `(X, Y, Z)` bool brain mask (undilated), whose bounding box centres the output grid.
        affine: `(4, 4)` voxel-to-world (RAS, mm) matrix.
        path: the file it came from, for the log.
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    path: str


@dataclasses.dataclass
class Grid:
    """The output grid shared by all subjects.

    Attributes:
        affine: `(4, 4)` voxel-to-world (RAS, mm) matrix of the outputs.
        shape: `(X, Y, Z)` in voxels, each divisible by 16.
        spacing: `(3,)` voxel size in mm.
        description: one paragraph for the log: orientation, what was padded or cropped relative
            to the template's field of view, and the margins around the template's brain.
        brain_fits: False when the template's brain is larger than the box on some axis.
    """

    affine: np.ndarray
    shape: tuple
    spacing: tuple
    description: str
    brain_fits: bool


def _dilate(mask, iterations=1):
    """Binary dilation by the 6-neighbour cross, `iterations` times (numpy only; not past edges)."""
    mask = np.asarray(mask, bool)
    for _ in range(int(iterations)):
        grown = mask.copy()
        for axis in range(mask.ndim):
            lead = [slice(None)] * mask.ndim
            trail = [slice(None)] * mask.ndim
            lead[axis], trail[axis] = slice(1, None), slice(None, -1)
            grown[tuple(lead)] |= mask[tuple(trail)]
            grown[tuple(trail)] |= mask[tuple(lead)]
        mask = grown
    return mask


def _skull_strip(image, brain, mask_dilation=1):
    """`(normalised image, strip mask)`: [0, 1] inside the dilated brain, exactly 0 outside."""
    strip = _dilate(brain, mask_dilation) if mask_dilation > 0 else brain
    out = io.normalize_intensity(image, mask=brain)
    out[~strip] = 0.0
    return out, strip


def load_template(path, mask_path=None, label_path=None, mask_dilation=1):
    """Loads a template: skull stripped (if a mask or label map is given) and normalised.

    Args:
        path: NIfTI image. Without `mask_path` or `label_path` it must already be skull-stripped:
            its brain is taken as the non-zero voxels.
        mask_path: optional brain mask on the same grid (non-zero = brain).
        label_path: optional label map on the same grid (`labels > 0` = brain); ignored when
            `mask_path` is given. E.g. the cohort's first subject and its parcellation.
        mask_dilation: voxels by which the brain mask is dilated before skull stripping.

    Returns:
        `Template` with the image in [0, 1] (0 outside the dilated brain) on the file's grid.

    Raises:
        InvalidInputError: unreadable files, different grids, an empty brain mask.
    """
    path = os.fspath(path)
    image, img = io.load_image(path)
    if mask_path is not None or label_path is not None:
        brain, _ = _read_brain(img, path, label_path, mask_path)
    else:
        brain = image != 0
        if brain.all():
            logging.warning("%s: the template has no zero background; is it skull-stripped? "
                            "(pass --template_mask)", path)
    normed, _ = _skull_strip(image, brain, mask_dilation if (mask_path or label_path) else 0)
    return Template(image=normed, mask=brain, affine=np.asarray(img.affine, np.float64), path=path)


def _parse_triplet(value, name, kind=float):
    """`"2"` or `"1,1,1.2"` (or a number or sequence) -> tuple of 3 `kind`."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be 1 or 3 comma-separated numbers, got {value!r}") \
                from None
    elif np.isscalar(value):
        values = [kind(value)]
    else:
        values = [kind(v) for v in value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be 1 or 3 positive numbers, got {value!r}")
    return tuple(values)


def check_shape(shape):
    """`shape` as a tuple of 3 ints, each divisible by 16.

    Raises:
        ValueError: not 3 positive integers, or one is not divisible by 16.
    """
    shape = _parse_triplet(shape, "shape", kind=int)
    bad = [s for s in shape if s % SHAPE_DIVISOR]
    if bad:
        fixed = tuple(int(np.ceil(s / SHAPE_DIVISOR) * SHAPE_DIVISOR) for s in shape)
        raise ValueError(f"shape {shape}: every size must be divisible by {SHAPE_DIVISOR} (the "
                         f"networks' down-sampling factor); e.g. {fixed}")
    return shape


def _zooms(affine):
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def target_grid(template, shape=DEFAULT_SHAPE, spacing=None):
    """The output grid: the template's axes in RAS order, centred on the template's brain.

    Output axis k is the template axis closest to world axis k (R, A, S), flipped where needed
    (no rotation, so the template's own voxels map onto output voxels when `spacing` is the
    template's). The box's centre lies on the centre of the template brain's bounding box,
    snapped to the nearest template voxel centre.

    Args:
        template: `Template`.
        shape: `(X, Y, Z)` output size in voxels, each divisible by 16.
        spacing: output voxel size in mm (one number or three, in output axis order); default
            the template's voxel size.

    Returns:
        `Grid`.

    Raises:
        ValueError: bad `shape` or `spacing`.
    """
    shape = check_shape(shape)
    affine = np.asarray(template.affine, np.float64)
    zooms = _zooms(affine)
    unit = affine[:3, :3] / zooms
    ornt = nib.orientations.io_orientation(affine)  # ornt[j] = (world axis, flip) of axis j
    src_axis = [int(np.flatnonzero(ornt[:, 0] == k)[0]) for k in range(3)]
    flips = [float(ornt[j, 1]) for j in src_axis]
    direction = np.stack([unit[:, j] * f for j, f in zip(src_axis, flips)], axis=1)
    if spacing is None:
        spacing = tuple(float(zooms[j]) for j in src_axis)
    else:
        spacing = _parse_triplet(spacing, "spacing")
    lin = direction @ np.diag(spacing)

    idx = np.argwhere(template.mask)
    if idx.size == 0:
        raise ValueError(f"{template.path}: the template's brain mask is empty")
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    centre = affine[:3, :3] @ ((lo + hi) / 2.0) + affine[:3, 3]
    origin = centre - lin @ ((np.asarray(shape) - 1) / 2.0)
    # Snap the origin to the nearest template voxel centre (no half-voxel shift at equal spacing).
    origin_vox = np.linalg.solve(affine[:3, :3], origin - affine[:3, 3])
    origin = affine[:3, :3] @ np.round(origin_vox) + affine[:3, 3]
    out_affine = np.eye(4)
    out_affine[:3, :3] = lin
    out_affine[:3, 3] = origin

    parts, fits = [], True
    brain_extent = (hi - lo + 1) * zooms
    for k, j in enumerate(src_axis):
        fov = template.mask.shape[j] * zooms[j] / spacing[k]
        extent = brain_extent[j] / spacing[k]
        diff = shape[k] - fov
        action = f"padded by {diff:.0f}" if diff >= 0 else f"cropped by {-diff:.0f}"
        margin = (shape[k] - extent) / 2.0
        fits = fits and margin >= 0
        parts.append(f"axis {k} ({_AXIS_NAMES[k]}, template axis {j}): {action} voxels "
                     f"(template field of view {fov:.0f}), brain {extent:.0f} voxels, margin "
                     f"{margin:.1f} per side")
    description = (f"output grid {'x'.join(map(str, shape))} voxels at "
                   f"{'x'.join(f'{s:g}' for s in spacing)} mm, RAS, centred on the brain of "
                   f"{template.path}: " + "; ".join(parts))
    if not fits:
        description += (" -- the template's brain does NOT fit in the box: use a larger --shape "
                        "or --spacing")
    return Grid(affine=out_affine, shape=shape, spacing=tuple(float(s) for s in spacing),
                description=description, brain_fits=fits)


# ------------------------------------------------------------------------------------------------
# SimpleITK conversion and registration
# ------------------------------------------------------------------------------------------------
def _itk_geometry(affine):
    """`(spacing, direction, origin)` of ITK (LPS) for a NIfTI (RAS) voxel-to-world affine."""
    affine = np.asarray(affine, np.float64)
    zooms = _zooms(affine)
    unit = affine[:3, :3] / zooms
    u, _, vt = np.linalg.svd(unit)
    ortho = u @ vt
    if np.abs(ortho - unit).max() > 1e-2:
        raise ValueError("the affine has shear (non-orthogonal axes); SimpleITK cannot represent "
                         "its grid")
    return (tuple(float(z) for z in zooms), tuple((_LPS @ ortho).ravel().tolist()),
            tuple((_LPS @ affine[:3, 3]).tolist()))


def to_sitk(array, affine):
    """A SimpleITK image of a nibabel-ordered array with its NIfTI affine.

    Args:
        array: `(X, Y, Z)` array (voxel index `(i, j, k)` as nibabel returns it).
        affine: `(4, 4)` voxel-to-world matrix, RAS, mm.

    Returns:
        `sitk.Image` of size `(X, Y, Z)` whose physical points (LPS, mm) are those of `affine`.

    Raises:
        ValueError: the affine has shear.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    spacing, direction, origin = _itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def from_sitk(image):
    """The `(X, Y, Z)` array of a SimpleITK image (inverse of `to_sitk`'s axis order)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _reference(affine, shape):
    reference = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    spacing, direction, origin = _itk_geometry(affine)
    reference.SetSpacing(spacing)
    reference.SetDirection(direction)
    reference.SetOrigin(origin)
    return reference


def register_affine(fixed_sitk, moving_sitk, metric="mattes", shrink_factors=(4, 2, 1),
                    smoothing_sigmas=(2.0, 1.0, 0.0), sampling=0.2, iterations=100, seed=1):
    """Affine registration of `moving_sitk` to `fixed_sitk` (SimpleITK, multi-resolution).

    Centred initialisation by moments (the centres of mass coincide), then a 12-parameter
    `sitk.AffineTransform` optimised by regular-step gradient descent with parameter scales from
    physical shifts, on Mattes mutual information (32 bins) or normalised correlation, sampled on
    a seeded random `sampling` fraction of the fixed voxels, level by level at `shrink_factors`
    with Gaussian smoothing `smoothing_sigmas` (voxels).

    Args:
        fixed_sitk: the template, a 3D `sitk.Image` (cast to float32).
        moving_sitk: the subject, a 3D `sitk.Image` (cast to float32), e.g. skull-stripped.
        metric: "mattes" (mutual information, any contrasts) or "correlation" (same modality).
        shrink_factors: down-sampling per level, coarse to fine.
        smoothing_sigmas: Gaussian sigma per level in voxels.
        sampling: fraction of the fixed image's voxels sampled for the metric, in (0, 1].
        iterations: largest number of optimiser iterations per level.
        seed: seed of the metric sampling (fixed, so a run is repeatable).

    Returns:
        `sitk.AffineTransform` mapping fixed physical points (LPS, mm) to moving ones, as
        `sitk.Resample(moving, reference, transform)` expects: `aligned(x) = moving(T(x))`.
        (`register_affine_with_info` also returns the final metric value and iterations.)

    Raises:
        ValueError: unknown `metric`, or inconsistent levels.
        RuntimeError: SimpleITK fails (e.g. too few overlapping samples).
    """
    transform, _ = register_affine_with_info(fixed_sitk, moving_sitk, metric=metric,
                                             shrink_factors=shrink_factors,
                                             smoothing_sigmas=smoothing_sigmas,
                                             sampling=sampling, iterations=iterations, seed=seed)
    return transform


def register_affine_with_info(fixed_sitk, moving_sitk, metric="mattes", shrink_factors=(4, 2, 1),
                              smoothing_sigmas=(2.0, 1.0, 0.0), sampling=0.2, iterations=100,
                              seed=1):
    """`register_affine`, also returning `{"metric_value", "iterations", "stop"}`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(shrink_factors) != len(smoothing_sigmas):
        raise ValueError("shrink_factors and smoothing_sigmas need one entry per level")
    if not 0.0 < sampling <= 1.0:
        raise ValueError(f"sampling must be in (0, 1], got {sampling}")
    fixed = sitk.Cast(fixed_sitk, sitk.sitkFloat32)
    moving = sitk.Cast(moving_sitk, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(fixed.GetDimension()),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=int(iterations),
        gradientMagnitudeTolerance=1e-6, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_sigmas])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    counter = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__(0, counter[0] + 1))
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError as err:
        raise RuntimeError(f"affine registration failed: {' '.join(str(err).split())[-300:]}") \
            from None
    transform = result.Downcast() if hasattr(result, "Downcast") else result
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0).Downcast()
    info = {"metric_value": float(reg.GetMetricValue()), "iterations": counter[0],
            "stop": reg.GetOptimizerStopConditionDescription()}
    return sitk.AffineTransform(transform), info


def _resample(image, reference, transform, nearest):
    return sitk.Resample(image, reference, transform,
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0,
                         image.GetPixelID())


def _faces_count(mask):
    """Number of True voxels on the six outer faces of a 3D mask."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1, 1:-1] = mask[1:-1, 1:-1, 1:-1]
    return int(mask.sum() - inner.sum())


# ------------------------------------------------------------------------------------------------
# One subject
# ------------------------------------------------------------------------------------------------
def _read_brain(img, image_path, label_path, mask_path):
    """`(brain mask, labels or None)` on the image's grid."""
    labels = None
    if label_path is not None:
        labels, lab_img = io.load_labels(label_path)
        io.check_same_grid(img, image_path, lab_img, label_path)
    if mask_path is not None:
        mask, mask_img = io.load_volume(mask_path, kind="image")
        io.check_same_grid(img, image_path, mask_img, mask_path)
        brain, source = mask > 0, mask_path
    elif labels is not None:
        brain, source = labels > 0, label_path
    else:
        raise ValueError(f"{image_path}: a label map or a brain mask is needed for skull stripping")
    if not brain.any():
        raise io.InvalidInputError(f"{source}: the brain mask is empty (no voxel > 0)")
    return brain, labels


def outputs_of(out_dir, subject_id, with_labels=True):
    """`{"image": path, "labels": path or None}` that `preprocess_subject` writes."""
    out_dir = os.fspath(out_dir)
    return {"image": os.path.join(out_dir, "images", f"{subject_id}.nii.gz"),
            "labels": (os.path.join(out_dir, "labels", f"{subject_id}.nii.gz")
                       if with_labels else None)}


def preprocess_subject(image_path, out_dir, subject_id, label_path=None, mask_path=None,
                       template=None, shape=DEFAULT_SHAPE, spacing=None, mask_dilation=1,
                       metric="mattes", grid=None):
    """Skull strips, normalises, aligns to the template, resamples and writes one subject.

    Args:
        image_path: T1 image (NIfTI), skull on or off.
        out_dir: output folder; writes `images/<subject_id>.nii.gz` (float32 in [0, 1]) and, with
            `label_path`, `labels/<subject_id>.nii.gz` (uint16, int32 if needed), atomically.
        subject_id: output file name without extension.
        label_path: optional label map on the image's grid; `labels > 0` is the brain mask unless
            `mask_path` is given. Resampled by nearest neighbour.
        mask_path: optional brain mask on the image's grid (non-zero = brain).
        template: `Template`, or the path of a skull-stripped NIfTI (`load_template(path)`), or
            None: the subject's own skull-stripped image (no alignment, just crop and resample).
        shape: `(X, Y, Z)` output size in voxels, each divisible by 16.
        spacing: output voxel size in mm (one or three numbers); default the template's.
        mask_dilation: voxels by which the brain mask is dilated for skull stripping.
        metric: "mattes" or "correlation" (see `register_affine`).
        grid: optional precomputed `target_grid(template, shape, spacing)` (then `shape` and
            `spacing` are ignored).

    Returns:
        dict: `subject`, `image` and `labels` (written paths; `labels` None without a label map),
        `template` (path), `shape`, `spacing` (mm), `affine` (output, 4x4 list), `transform`
        (12 affine parameters, LPS mm, fixed-to-moving, and `center`), `scale` (cube root of the
        transform's determinant, about 1 for similar heads), `metric_value`, `iterations`,
        `brain_voxels_in`, `brain_voxels_out`, `brain_on_faces` (brain voxels on the box's faces,
        0 when nothing is cut), `labels_in`, `labels_lost` (labels that vanished in resampling),
        `warnings` (list of str) and `seconds`.

    Raises:
        InvalidInputError: unreadable, invalid or mismatched inputs (message starts with the path).
        ValueError: no label map and no mask; bad `shape`, `spacing` or `metric`.
        RuntimeError: the registration fails.
        OSError: an output cannot be written.
    """
    start = time.time()
    image_path = os.fspath(image_path)
    image, img = io.load_image(image_path)
    brain, labels = _read_brain(img, image_path, label_path, mask_path)
    stripped, _ = _skull_strip(image, brain, mask_dilation)
    affine = np.asarray(img.affine, np.float64)

    identity = template is None
    if identity:
        template = Template(image=stripped, mask=brain, affine=affine, path=image_path)
    elif not isinstance(template, Template):
        template = load_template(template)
    if grid is None:
        grid = target_grid(template, shape, spacing)

    moving = to_sitk(stripped, affine)
    if identity:
        transform, info = sitk.AffineTransform(3), {"metric_value": float("nan"), "iterations": 0}
    else:
        transform, info = register_affine_with_info(to_sitk(template.image, template.affine),
                                                    moving, metric=metric)
    reference = _reference(grid.affine, grid.shape)
    out_image = np.clip(from_sitk(_resample(moving, reference, transform, nearest=False)), 0, 1)
    out_image = out_image.astype(np.float32)
    if labels is not None:
        out_labels = from_sitk(_resample(to_sitk(labels.astype(np.int32), affine), reference,
                                         transform, nearest=True)).astype(np.int32)
        out_brain = out_labels > 0 if mask_path is None else None
    else:
        out_labels = None
    if labels is None or mask_path is not None:
        out_brain = from_sitk(_resample(to_sitk(brain.astype(np.uint8), affine), reference,
                                        transform, nearest=True)) > 0

    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    scale = float(np.cbrt(abs(np.linalg.det(matrix))))
    warnings = []
    on_faces = _faces_count(out_brain)
    if on_faces:
        warnings.append(f"{on_faces} brain voxels ({100.0 * on_faces / out_brain.sum():.2g}% "
                        f"of the brain in the box) lie on the faces of the "
                        f"{'x'.join(map(str, grid.shape))} box: the brain is cut there; use a "
                        "larger --shape or --spacing")
    if not 0.7 < scale < 1.4:
        warnings.append(f"the affine transform scales volumes by {scale ** 3:.2f}: check the "
                        "alignment (wrong template or mask?)")
    lost, labels_in = [], []
    if labels is not None:
        labels_in = np.unique(labels[labels > 0])
        lost = sorted(set(labels_in.tolist()) - set(np.unique(out_labels).tolist()))
        if lost:
            warnings.append(f"labels lost in resampling: {lost}")
    if not np.any(out_brain):
        raise RuntimeError(f"{image_path}: no brain voxel lands in the output box; the alignment "
                           "failed")

    outputs = outputs_of(out_dir, subject_id, with_labels=labels is not None)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = b"mdregnet.preprocess"
    if out_labels is not None:
        os.makedirs(os.path.dirname(outputs["labels"]), exist_ok=True)
        fits16 = out_labels.min() >= 0 and out_labels.max() <= np.iinfo(np.uint16).max
        io.save_volume(outputs["labels"], out_labels, grid.affine, header=header,
                       dtype=np.uint16 if fits16 else np.int32)
    # The image last: its presence (with the labels) marks the subject as done. If it cannot be
    # written (disk full, ...), the labels just written go too: no half-done subject is left.
    try:
        os.makedirs(os.path.dirname(outputs["image"]), exist_ok=True)
        io.save_volume(outputs["image"], out_image, grid.affine, header=header,
                       dtype=np.float32)
    except BaseException:
        if outputs["labels"] is not None:
            try:
                os.remove(outputs["labels"])
            except OSError:
                pass
        raise

    for warning in warnings:
        logging.warning("%s: %s", subject_id, warning)
    return {
        "subject": subject_id,
        "image": outputs["image"],
        "labels": outputs["labels"],
        "template": template.path,
        "shape": tuple(int(s) for s in grid.shape),
        "spacing": tuple(float(s) for s in grid.spacing),
        "affine": grid.affine.tolist(),
        "transform": {"matrix": matrix.tolist(), "translation": list(transform.GetTranslation()),
                      "center": list(transform.GetCenter())},
        "scale": scale,
        "metric_value": info["metric_value"],
        "iterations": info["iterations"],
        "brain_voxels_in": int(brain.sum()),
        "brain_voxels_out": int(out_brain.sum()),
        "brain_on_faces": on_faces,
        "labels_in": int(len(labels_in)),
        "labels_lost": lost,
        "warnings": warnings,
        "seconds": time.time() - start,
    }


# ------------------------------------------------------------------------------------------------
# Batch (command line)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One subject of a batch: its files, or the reason it cannot run."""

    id: str
    image: str
    labels: Optional[str] = None
    mask: Optional[str] = None
    error: Optional[str] = None


def find_jobs(image_dir, label_dir=None, mask_dir=None, subjects=None):
    """Lists the subjects with their label map and mask (`mdregnet.data.find_subjects` matching).

    A label (or mask) file matches an image with id `<id>` when its name without extension is
    `<id>` or starts with `<id>` and a non-alphanumeric character: IXI's `<ID>_T1.nii.gz` matches
    `<ID>_T1_DLMUSE.nii.gz`. A subject without a match gets `error` set (reported as a failure of
    that subject, the batch goes on).

    Args:
        image_dir: folder of images; ids are their file names without `.nii` / `.nii.gz`.
        label_dir, mask_dir: optional folders; at least one is needed.
        subjects: optional text file of ids (one per line, `#` comments) to process, in order.

    Returns:
        list of `Job`, in sorted id order (or the order of `subjects`).

    Raises:
        InvalidInputError: missing folders, no images, unknown ids in `subjects`.
        ValueError: neither `label_dir` nor `mask_dir`.
    """
    from mdregnet import data

    if label_dir is None and mask_dir is None:
        raise ValueError("--labels or --masks is needed for skull stripping")
    for folder in (label_dir, mask_dir):
        if folder is not None and not os.path.isdir(folder):
            raise io.MissingFileError(f"{folder}: no such directory")
    jobs = []
    for subject in data.find_subjects(image_dir, subjects=subjects):
        job = Job(id=subject.id, image=subject.image)
        for attr, folder in (("labels", label_dir), ("mask", mask_dir)):
            if folder is None:
                continue
            try:
                found = data.find_subjects(image_dir, folder, subjects=[subject.id])
                setattr(job, attr, found[0].labels)
            except io.InvalidInputError as err:
                job.error = str(err)
        jobs.append(job)
    return jobs


_WORKER = {}


def _init_worker(template, grid, options, threads):
    _WORKER.update(template=template, grid=grid, options=options)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    logging.set_verbosity(logging.ERROR)  # the parent logs each subject's warnings


def _run_job(job, out_dir, template=None, grid=None, options=None):
    """`(job.id, stats or None, error line or None)`; never raises."""
    template = template if template is not None else _WORKER.get("template")
    grid = grid if grid is not None else _WORKER.get("grid")
    options = options if options is not None else _WORKER.get("options", {})
    try:
        stats = preprocess_subject(job.image, out_dir, job.id, label_path=job.labels,
                                   mask_path=job.mask, template=template, grid=grid, **options)
        return job.id, stats, None
    except Exception as err:  # noqa: BLE001 -- reported per subject, the batch goes on
        message = " ".join(str(err).split())
        paths = [p for p in (job.image, job.labels, job.mask) if p]
        if not any(message.startswith(p) for p in paths):
            message = f"{job.image}: {type(err).__name__}: {message}"
        return job.id, None, message


def _default_workers():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus)), cpus


def _fmt_seconds(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_batch(jobs, out_dir, template, shape=DEFAULT_SHAPE, spacing=None, workers=None,
              overwrite=False, mask_dilation=1, metric="mattes"):
    """Preprocesses `jobs` in parallel, skipping those already done; never stops on a failure.

    Args:
        jobs: list of `Job` (`find_jobs`).
        out_dir: output folder.
        template: `Template` shared by all subjects.
        shape, spacing, mask_dilation, metric: as for `preprocess_subject`.
        workers: processes (default min(2, CPUs)); 1 runs in this process.
        overwrite: redo subjects whose outputs exist.

    Returns:
        dict `{"done": [stats], "skipped": [ids], "failed": [(id, message)], "seconds": float}`.
    """
    default_workers, cpus = _default_workers()
    workers = default_workers if workers is None else max(1, int(workers))
    grid = target_grid(template, shape, spacing)
    logging.info("%s", grid.description)
    if not grid.brain_fits:
        logging.warning("the template's brain does not fit in the output box")
    options = {"mask_dilation": mask_dilation, "metric": metric}
    os.makedirs(out_dir, exist_ok=True)

    result = {"done": [], "skipped": [], "failed": [], "seconds": 0.0}
    todo = []
    for job in jobs:
        if job.error is not None:
            result["failed"].append((job.id, job.error))
            logging.error("FAILED %s: %s", job.id, job.error)
            continue
        paths = outputs_of(out_dir, job.id, with_labels=job.labels is not None)
        if not overwrite and all(os.path.exists(p) for p in paths.values() if p):
            result["skipped"].append(job.id)
            continue
        todo.append(job)
    if result["skipped"]:
        logging.info("skipping %d subject(s) whose outputs exist (use --overwrite to redo): %s",
                     len(result["skipped"]), ", ".join(result["skipped"][:10])
                     + (" ..." if len(result["skipped"]) > 10 else ""))

    start = time.time()
    total = len(todo)

    def report(k, subject_id, stats, error, log_warnings=False):
        elapsed = time.time() - start
        eta = elapsed / k * (total - k)
        if error is not None:
            result["failed"].append((subject_id, error))
            logging.error("[%d/%d] FAILED %s: %s (elapsed %s, ETA %s)", k, total, subject_id,
                          error, _fmt_seconds(elapsed), _fmt_seconds(eta))
            return
        result["done"].append(stats)
        if log_warnings:
            for warning in stats["warnings"]:
                logging.warning("%s: %s", subject_id, warning)
        notes = f", {len(stats['warnings'])} warning(s)" if stats["warnings"] else ""
        logging.info("[%d/%d] %s done in %.1f s (scale %.3f, brain on faces %d%s); elapsed %s, "
                     "ETA %s", k, total, subject_id, stats["seconds"], stats["scale"],
                     stats["brain_on_faces"], notes, _fmt_seconds(elapsed), _fmt_seconds(eta))

    if total:
        logging.info("preprocessing %d subject(s) with %d worker(s)", total, min(workers, total))
    if workers == 1 or total <= 1:
        for k, job in enumerate(todo, 1):
            report(k, *_run_job(job, out_dir, template, grid, options))
    elif total:
        workers = min(workers, total)
        threads = max(1, cpus // workers)
        # spawn, not fork: the parent may hold threads (TensorFlow, ITK) that fork would copy.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=_init_worker,
                initargs=(template, grid, options, threads)) as pool:
            futures = {pool.submit(_run_job, job, out_dir): job for job in todo}
            for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
                job = futures[future]
                try:
                    report(k, *future.result(), log_warnings=True)
                except Exception as err:  # noqa: BLE001 -- e.g. a worker killed (out of memory)
                    report(k, job.id, None, f"{job.image}: worker failed: {type(err).__name__}: "
                           f"{err}")
    result["seconds"] = time.time() - start
    return result


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags on `flag_values` (called by `python -m`, and by tests on a
    fresh `flags.FlagValues()`), not on import."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("images", None, "Folder of T1 images (*.nii, *.nii.gz); a subject's id is "
                        "the file name without extension.", **fv)
    flags.DEFINE_string("labels", None, "Folder of label maps; a file matches an image when its "
                        "name starts with the image's id (<ID>_T1 -> <ID>_T1_DLMUSE). labels > 0 "
                        "is the brain mask unless --masks is given.", **fv)
    flags.DEFINE_string("masks", None, "Optional folder of brain masks (non-zero = brain), "
                        "matched like --labels.", **fv)
    flags.DEFINE_string("out", None, "Output folder: images/<id>.nii.gz, labels/<id>.nii.gz.",
                        **fv)
    flags.DEFINE_string("template", "mni152", "Skull-stripped template: a NIfTI file, 'mni152' "
                        "(the MNI152 2009a brain at 2 mm shipped in mdregnet/assets, on which the "
                        "shipped models were trained) or 'first' (the first subject, "
                        "skull-stripped).", **fv)
    flags.DEFINE_string("template_mask", None, "Brain mask of --template, when the template is "
                        "not skull-stripped.", **fv)
    flags.DEFINE_string("spacing", None, "Output voxel size in mm, one or three numbers; default "
                        "the template's.", **fv)
    flags.DEFINE_string("shape", ",".join(map(str, DEFAULT_SHAPE)), "Output size in voxels, "
                        "each divisible by 16 (176,192,176 at 1 mm as in the paper).", **fv)
    flags.DEFINE_string("subjects", None, "Optional file of subject ids to process, one per line "
                        "('#' starts a comment).", **fv)
    flags.DEFINE_integer("workers", None, "Parallel processes; default min(2, CPUs).", **fv)
    flags.DEFINE_boolean("overwrite", False, "Redo subjects whose outputs exist.", **fv)
    flags.DEFINE_integer("mask_dilation", 1, "Voxels by which the brain mask is dilated before "
                         "skull stripping.", **fv)
    flags.DEFINE_enum("metric", "mattes", list(METRICS), "Affine registration metric.", **fv)


def _first_template(jobs, mask_dilation):
    """The first subject that loads, skull-stripped: `(Template, id)`.

    Raises:
        InvalidInputError: no subject loads; the message starts with the first one's error
            (which names its file).
    """
    errors = []
    for job in jobs:
        if job.error is not None:
            errors.append(job.error)
            continue
        try:
            return load_template(job.image, mask_path=job.mask, label_path=job.labels,
                                 mask_dilation=mask_dilation), job.id
        except (io.InvalidInputError, ValueError) as err:
            logging.warning("cannot use %s as the template: %s", job.id, err)
            errors.append(" ".join(str(err).split()))
    first = errors[0] if errors else "no subjects"
    more = f" (and {len(errors) - 1} more subject(s) failed)" if len(errors) > 1 else ""
    raise io.InvalidInputError(f"{first}{more}; no subject can serve as the template with "
                               "--template first; fix it or pass --template")


def run_from_flags(fv):
    """Runs the command from parsed flags. Returns the exit status: 0, or 1 if a subject failed.

    Raises:
        InvalidInputError, ValueError: bad folders, flags or template (before any subject runs).
        OSError: `--out` is not a writable folder (checked before any subject runs).
    """
    for name in ("images", "out"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required")
    shape = check_shape(fv.shape)
    spacing = None if fv.spacing is None else _parse_triplet(fv.spacing, "spacing")
    io.check_output_dir(fv.out)
    jobs = find_jobs(fv.images, fv.labels, fv.masks, fv.subjects)
    if fv.template not in (None, "", "first"):
        path = assets.MNI152_TEMPLATE if fv.template == "mni152" else fv.template
        template = load_template(path, mask_path=fv.template_mask)
        logging.info("template: %s", path)
    else:
        template, first = _first_template(jobs, fv.mask_dilation)
        logging.info("template: the first subject, %s, skull-stripped (%s); every subject is "
                     "affinely aligned to it", first, template.path)
    result = run_batch(jobs, fv.out, template, shape=shape, spacing=spacing, workers=fv.workers,
                       overwrite=fv.overwrite, mask_dilation=fv.mask_dilation, metric=fv.metric)
    done, failed = result["done"], result["failed"]
    mean = np.mean([s["seconds"] for s in done]) if done else 0.0
    print(f"mdregnet.preprocess: {len(jobs)} subject(s): {len(done)} done, "
          f"{len(result['skipped'])} skipped (outputs exist), {len(failed)} failed, in "
          f"{_fmt_seconds(result['seconds'])} (mean {mean:.1f} s per subject); outputs in "
          f"{os.path.abspath(fv.out)}")
    cut = [s["subject"] for s in done if s["brain_on_faces"]]
    if cut:
        print(f"  brain cut by the box in {len(cut)} subject(s): {', '.join(cut)}")
    for subject_id, message in failed:
        print(f"  FAILED {subject_id}: {message}")
    return 1 if failed else 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        return run_from_flags(FLAGS)
    except (OSError, ValueError) as err:  # io.InvalidInputError is a ValueError
        sys.exit(f"mdregnet.preprocess: error: {' '.join(str(err).split())}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
