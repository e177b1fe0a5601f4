"""Register one moving image to one fixed image with a trained model: `python -m mdregnet.infer`.

    python -m mdregnet.infer --moving sub01.nii.gz --fixed template.nii.gz --out reg/ \
        [--model runs/mdregnet] [--preprocess [--template mni152]] \
        [--moving_labels sub01_seg.nii.gz --fixed_labels template_seg.nii.gz] \
        [--refine_steps 50 [--refine_lr 0.1]]
    python -m mdregnet.infer [--out reg/]    # the embedded default pair (mdregnet.assets)
    python -m mdregnet.infer --fixed template.nii.gz --moving_dir DIR --out reg/    # a cohort
    python -m mdregnet.infer --atlas A --atlas_labels L --subjects_dir DIR --out seg/

The last two are the cohort modes (every subject of a folder to a template, or an atlas and its
labels to every subject, batched, resumable, one folder per subject and a CSV): see
`mdregnet.cohort`, which also documents `--labels_dir`, `--subjects`, `--batch_size` and
`--strategy`.

Without `--moving` and `--fixed`, the embedded default pair is registered: Colin27 (moving, with
its AAL labels) to the MNI152 2009a brain (fixed), both shipped in `mdregnet/assets` on the grid
of the shipped models, so the command works on a machine with nothing else; `--out` defaults to
`mdregnet_out`.

With `--preprocess`, both images first go through `mdregnet.preprocess.preprocess_subject` as the
training subjects did: skull stripping with the label map (`labels > 0`), a `--moving_mask` /
`--fixed_mask`, or, without either, the image's non-zero voxels (an image already
skull-stripped); robust normalisation; affine alignment to `--template` (default: the shipped
MNI152 brain) with SimpleITK; resampling onto the template's grid of the model's input size
(80x112x80 at 2 mm for the shipped models). The outputs then live on that template grid.

Data flow (CONVENTIONS.md): both images are read and validated by `mdregnet.io`; intensities
outside [0, 1] are min-max normalised (robust, `io.normalize_intensity`); a moving image on
another grid is resampled onto the fixed grid through the two affines (trilinear; its label map
by nearest neighbour); the model is rebuilt for the fixed grid when that grid's sizes are
divisible by the model's down-sampling factor, otherwise both images are zero-padded to the next
multiple and every output is cropped back. The model returns `disp` `(X, Y, Z, 3)` in voxels of
the fixed grid, `warped(p) = moving(p + disp(p))`, and for diffeomorphic models `inverse_disp`.

With `--refine_steps N` (N > 0; diffeomorphic models only), the model's stationary velocity field
for this pair is then refined by N Adam steps on the model's own loss (`mdregnet.refine`, after
the FCN paper's Discussion: optimise the transformation of a new pair by backpropagation), and
every output below comes from the refined field, still `exp(v)` by the model's scaling and
squaring.

Outputs in `--out` (all on the fixed image's grid, with its affine and header):
    warped.nii.gz            moving image warped onto the fixed image (trilinear)
    disp.nii.gz              displacement, voxels, `(X, Y, Z, 3)` (component c along array axis c)
    disp_itk.nii.gz          the same in mm, LPS, `(X, Y, Z, 1, 3)`, intent 1007 (ANTs/ITK)
    inverse_disp.nii.gz      inverse displacement (diffeomorphic models), voxels
    inverse_disp_itk.nii.gz  the same for ANTs/ITK
    jacobian_det.nii.gz      det(I + grad disp) (folding where <= 0)
    warped_labels.nii.gz     moving label map warped by nearest neighbour (with --moving_labels)
    summary.json             model, shapes, time of the model call (one call: it includes the
                             one-time graph tracing and XLA compilation; with refinement, its
                             time too), folding (grid and, with --fixed_labels, brain mask),
                             SDlogJ, Dice (mean, per label, before registration), notes on what
                             was done, and 'refine' (null, or steps, seconds, loss_before,
                             loss_after, lr)
    figure.png               fixed / moving / warped slices, deformed grid, Jacobian map

Nothing is written into `--out` until every output exists: they are written into a temporary
folder beside it and renamed in at the end, so a failure leaves no partial outputs.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
import weakref

import numpy as np
import tensorflow as tf
from absl import app, flags
from scipy import ndimage

from mdregnet import assets, io, layers, metrics, models, preprocess, refine

#: The model used when --model is not given (shipped inside the package when it exists).
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                              "mdregnet_ixi2mm")

#: Every file `register` may write into the output folder.
OUTPUT_FILES = ("warped.nii.gz", "disp.nii.gz", "disp_itk.nii.gz", "inverse_disp.nii.gz",
                "inverse_disp_itk.nii.gz", "jacobian_det.nii.gz", "warped_labels.nii.gz",
                "summary.json", "figure.png")

#: Pairs of at least this many voxels run through one compiled forward pass per model and grid
#: (`compiled_forward`); smaller ones eagerly, where tracing the graph costs more than it saves.
#: Measured on a 2-core CPU with MDReg-Net: at 176x192x176 the first call took 6 s compiled
#: against 15 s eager and later calls 4 s against 12 s; at 80x112x80 the first call costs the
#: same and later calls are 25% faster; at 32^3 tracing adds 1.5 s to a 3 s first call.
COMPILE_MIN_VOXELS = 2**19

_COMPILED = weakref.WeakKeyDictionary()

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags on `flag_values`.

    Called by `python -m mdregnet.infer` (and by tests on a fresh `flags.FlagValues()`), not on
    import, so the package's apps can import each other without clashing flag names.
    """
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("moving", None, "Moving image (NIfTI); with --fixed. Without both: the "
                        "embedded default pair (Colin27 to MNI152).", **fv)
    flags.DEFINE_string("fixed", None, "Fixed image (NIfTI); outputs live on its grid.", **fv)
    flags.DEFINE_string("model", None, "Model directory written by mdregnet.models.save (default: "
                        "the pretrained model shipped at mdregnet/pretrained/mdregnet_ixi2mm, if "
                        "any).", **fv)
    flags.DEFINE_string("out", None, "Output directory (created); default: mdregnet_out.", **fv)
    flags.DEFINE_string("moving_labels", None, "Optional moving label map: warped, and Dice "
                        "reported when --fixed_labels is given too.", **fv)
    flags.DEFINE_string("fixed_labels", None, "Optional fixed label map (Dice, and folding inside "
                        "its brain mask).", **fv)
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"],
                      "cpu hides every GPU; gpu fails when none is visible; auto uses what is "
                      "there.", **fv)
    flags.DEFINE_boolean("figure", True, "Write figure.png.", **fv)
    flags.DEFINE_boolean("preprocess", False, "Skull strip, normalise and affine-align both "
                         "images to --template first (mdregnet.preprocess), onto the template "
                         "grid of the model's input size.", **fv)
    flags.DEFINE_string("template", "mni152", "With --preprocess: 'mni152' (shipped) or a "
                        "skull-stripped template NIfTI.", **fv)
    flags.DEFINE_string("moving_mask", None, "With --preprocess: brain mask of the moving image "
                        "(default: --moving_labels > 0, else its non-zero voxels).", **fv)
    flags.DEFINE_string("fixed_mask", None, "With --preprocess: brain mask of the fixed image.",
                        **fv)
    flags.DEFINE_integer("refine_steps", 0, "Test-time refinement: Adam steps on this pair's "
                         "velocity field with the model's own loss (mdregnet.refine); 0 = off.",
                         lower_bound=0, **fv)
    flags.DEFINE_float("refine_lr", None, "Adam step size of the refinement, voxels of the "
                       "velocity grid (default mdregnet.refine.DEFAULT_LR).", **fv)
    # Cohort mode (mdregnet.cohort).
    flags.DEFINE_string("moving_dir", None, "Cohort mode: register every image of this folder "
                        "(moving) to --fixed; outputs in --out/<id>/ and --out/cohort.csv.", **fv)
    flags.DEFINE_string("subjects_dir", None, "Cohort mode: register --atlas (moving) to every "
                        "image of this folder (fixed) and warp --atlas_labels onto each.", **fv)
    flags.DEFINE_string("atlas", None, "Atlas image, with --subjects_dir.", **fv)
    flags.DEFINE_string("atlas_labels", None, "Atlas label map, with --subjects_dir.", **fv)
    flags.DEFINE_string("labels_dir", None, "Cohort mode: folder of the subjects' label maps, "
                        "matched to image ids by name (optional per subject).", **fv)
    flags.DEFINE_string("subjects", None, "Cohort mode: file of subject ids to register, one a "
                        "line ('#' comments); default every image of the folder.", **fv)
    flags.DEFINE_integer("batch_size", 1, "Cohort mode: subjects per model call (global, split "
                         "over the --strategy replicas).", lower_bound=1, **fv)
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "Cohort mode: tf.distribute strategy; 'mirrored' splits each batch over "
                      "every visible GPU; 'multi_worker' splits the subjects over the hosts of "
                      "TF_CONFIG (mdregnet/cohort.py).", **fv)


# ------------------------------------------------------------------------------------------------
# Model: fit to a grid, run
# ------------------------------------------------------------------------------------------------
def model_config(model):
    """`(config, directory)` of a model built by `models.build` or of a saved model directory."""
    if isinstance(model, (str, os.PathLike)):
        return models.read_config(os.fspath(model)), os.fspath(model)
    if not hasattr(model, "mdregnet_config"):
        raise ValueError("model was not built by mdregnet.models.build (no mdregnet_config)")
    return model.mdregnet_config, None


def fit_model(model, shape):
    """The model, rebuilt if needed, for images of spatial size `shape`.

    A fully convolutional model takes any size divisible by its down-sampling factor. If `shape`
    is such a size the model is rebuilt for it (`models.load(dir, input_shape=shape)`, or the same
    weights copied into a model built for `shape`); otherwise the images must be zero-padded to
    the next multiple of the factor (returned in `pad`) and the outputs cropped back.

    Args:
        model: a `keras.Model` from `models.build`/`models.load`, or a saved model directory.
        shape: spatial size `(X, Y, Z)` of the (fixed) images.

    Returns:
        `(model, pad, note)`: `pad` a tuple of `(before, after)` per axis (all zeros when no
        padding is needed); `note` a sentence saying what was done, or None.
    """
    config, directory = model_config(model)
    shape = tuple(int(n) for n in shape)
    saved = tuple(int(n) for n in config["input_shape"])
    if len(shape) != len(saved):
        raise ValueError(f"images of shape {shape} do not fit a {len(saved)}D model "
                         f"(input shape {saved})")
    divisor = models.get_method(config["name"]).divisor
    target = tuple(int(math.ceil(n / divisor)) * divisor for n in shape)
    pad = tuple(((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(shape, target))
    note = None
    if target != shape:
        note = (f"grid {shape} is not divisible by the model's factor {divisor}: images "
                f"zero-padded to {target} (before/after per axis {[list(p) for p in pad]}) and "
                "outputs cropped back")
    elif shape != saved:
        note = f"model rebuilt for input shape {shape} (saved with {saved})"
    if directory is not None:
        fitted = models.load(directory, input_shape=target)
    elif target == saved:
        fitted = model
    else:
        fitted = models.build(config["name"], target, **config["hparams"])
        fitted.set_weights(model.get_weights())
        if "extra" in config:
            fitted.mdregnet_config["extra"] = config["extra"]
    return fitted, pad, note


def pad_volume(array, pad, value=0):
    """Pads the leading `len(pad)` axes of `array` by `pad` ((before, after) per axis)."""
    if not any(b or a for b, a in pad):
        return array
    widths = list(pad) + [(0, 0)] * (array.ndim - len(pad))
    return np.pad(array, widths, mode="constant", constant_values=value)


def crop_volume(array, pad):
    """Undoes `pad_volume` on the leading `len(pad)` axes."""
    if not any(b or a for b, a in pad):
        return array
    index = tuple(slice(b, array.shape[i] - a) for i, (b, a) in enumerate(pad))
    return array[index]


def compiled_forward(model, shape):
    """The model's forward pass as one `tf.function`, traced once per model and grid (cached).

    Args:
        model: a registration model taking `[moving, fixed]`.
        shape: spatial size `(X, Y, Z)` of the (padded) images.

    Returns:
        `fn(moving, fixed) -> outputs`, inputs `(1, *shape, 1)` float32 (fixed input signature,
        so it never retraces), `outputs` the model's output dict (inference mode).
    """
    shape = tuple(int(n) for n in shape)
    per_model = _COMPILED.setdefault(model, {})
    if shape not in per_model:
        spec = tf.TensorSpec((1, *shape, 1), tf.float32)
        model_ref = weakref.ref(model)  # the cache must not keep the model alive

        @tf.function(input_signature=[spec, spec])
        def forward(moving, fixed):
            return model_ref()([moving, fixed], training=False)

        per_model[shape] = forward
    return per_model[shape]


def predict(model, moving, fixed, pad=None, refine_steps=0, refine_lr=None):
    """Runs `model([moving, fixed])` on one pair and returns numpy outputs on the unpadded grid.

    Args:
        model: a registration model whose input shape is the padded image shape.
        moving, fixed: `(X, Y, Z)` float32 in [0, 1], on the same grid.
        pad: `(before, after)` per axis, from `fit_model`, or None.
        refine_steps: when > 0, the fields are refined by `refine.refine` (on the padded grid)
            with this many Adam steps of step size `refine_lr` (None: `refine.DEFAULT_LR`).

    Returns:
        `(outputs, seconds)`: `outputs` has 'disp' `(X, Y, Z, 3)` voxels, 'warped' `(X, Y, Z)`,
        and when the model has them 'inverse_disp' and 'warped_fixed'; with refinement also
        'refine', the `info` dict of `refine.refine`. `seconds` is the time of the model call
        (and refinement) alone, until the displacement is on the host. Grids of at least
        `COMPILE_MIN_VOXELS` voxels run through `compiled_forward` (the first call of a model on
        a grid includes tracing it), smaller ones eagerly.

    Raises:
        ValueError: `refine_steps > 0` for a model without a velocity field.
    """
    pad = pad or ((0, 0),) * moving.ndim
    m = pad_volume(np.asarray(moving, np.float32), pad)[None, ..., None]
    f = pad_volume(np.asarray(fixed, np.float32), pad)[None, ..., None]
    start = time.perf_counter()
    if m.size >= COMPILE_MIN_VOXELS:
        out = compiled_forward(model, m.shape[1:-1])(m, f)
    else:
        out = model([m, f], training=False)
    info = None
    if refine_steps:
        out, info = refine.refine(model, m, f, refine_steps, lr=refine_lr, outputs=out)
    disp = np.asarray(out["disp"])
    seconds = time.perf_counter() - start
    result = {"disp": crop_volume(disp[0], pad),
              "warped": crop_volume(np.asarray(out["warped"])[0, ..., 0], pad)}
    for key in ("inverse_disp", "warped_fixed"):
        if key in out:
            value = np.asarray(out[key])[0]
            result[key] = crop_volume(value[..., 0] if key == "warped_fixed" else value, pad)
    if info is not None:
        result["refine"] = info
    return result, seconds


def warp_labels(labels, disp):
    """Warps an integer label map `(X, Y, Z)` by `disp` `(X, Y, Z, 3)` (nearest neighbour)."""
    out = layers.warp(np.asarray(labels, np.int32)[None, ..., None],
                      np.asarray(disp, np.float32)[None], interp_method="nearest")
    return np.asarray(out)[0, ..., 0]


def jsonable(value):
    """`value` with numpy scalars/arrays turned into Python ones and NaN/inf into None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _same_grid(img_a, img_b, atol=1e-3):
    """Same shape and affine to `atol` mm (the tolerance of `io.check_same_grid`)."""
    return (tuple(img_a.shape[:3]) == tuple(img_b.shape[:3])
            and np.allclose(img_a.affine, img_b.affine, rtol=0.0, atol=atol))


def resample_to_grid(array, source_affine, target_affine, target_shape, order=1):
    """Resamples `array` (on `source_affine`) onto the grid `(target_affine, target_shape)`.

    A target voxel `p` takes the source value at `inv(A_source) @ A_target @ p` (world space is
    shared), trilinear (`order=1`) or nearest neighbour (`order=0`, label maps), 0 outside.
    """
    vox2vox = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(target_affine,
                                                                                np.float64)
    grid = np.indices(target_shape, dtype=np.float32).reshape(3, -1)
    coords = vox2vox[:3, :3].astype(np.float32) @ grid + vox2vox[:3, 3:].astype(np.float32)
    out = ndimage.map_coordinates(array, coords, order=order, mode="grid-constant", cval=0,
                                  prefilter=False)
    return out.reshape(target_shape).astype(array.dtype, copy=False)


def _to_unit_range(array, what, notes):
    lo, hi = float(np.min(array)), float(np.max(array))
    if lo < 0.0 or hi > 1.0:
        notes.append(f"{what} intensities in [{lo:.4g}, {hi:.4g}] were normalised to [0, 1] "
                     "(robust min-max, io.normalize_intensity)")
        return np.asarray(io.normalize_intensity(array), np.float32), True
    return np.asarray(array, np.float32), False


def _load_inputs(moving_path, fixed_path, moving_labels, fixed_labels):
    """Reads and validates everything before anything is written. Returns a dict."""
    fixed, fixed_img = io.load_image(fixed_path)
    moving, moving_img = io.load_image(moving_path)
    inputs = {"fixed": fixed, "fixed_img": fixed_img, "moving": moving, "moving_img": moving_img,
              "moving_labels": None, "fixed_labels": None}
    if moving_labels is not None:
        labels, labels_img = io.load_labels(moving_labels)
        io.check_same_grid(moving_img, moving_path, labels_img, moving_labels)
        inputs["moving_labels"] = labels
    if fixed_labels is not None:
        labels, labels_img = io.load_labels(fixed_labels)
        io.check_same_grid(fixed_img, fixed_path, labels_img, fixed_labels)
        inputs["fixed_labels"] = labels
    return inputs


# ------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------
def save_figure(path, fixed, moving, warped, disp, jac, title=""):
    """Writes the paper's Fig. 5 panels for the central slice along the last axis (PNG, Agg).

    Panels: fixed, moving, warped moving, |warped - fixed|, the deformed grid `p + disp(p)` of
    the slice (in-plane components), and the Jacobian determinant map (folded voxels in black).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    k = fixed.shape[2] // 2

    def sl(volume):
        return np.asarray(volume)[:, :, k].T  # array axis 0 horizontal, axis 1 vertical

    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    image_kw = dict(cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    for ax, volume, name in ((axes[0, 0], fixed, "fixed"), (axes[0, 1], moving, "moving"),
                             (axes[0, 2], warped, "warped moving")):
        ax.imshow(sl(volume), **image_kw)
        ax.set_title(name)
    diff = axes[1, 0].imshow(sl(np.abs(np.asarray(warped) - np.asarray(fixed))), cmap="magma",
                             vmin=0.0, origin="lower", interpolation="nearest")
    axes[1, 0].set_title("|warped - fixed|")
    fig.colorbar(diff, ax=axes[1, 0], fraction=0.046, pad=0.04)

    # Deformed grid: the fixed grid's points p mapped to p + u(p) (in-plane components).
    ax = axes[1, 1]
    nx, ny = fixed.shape[:2]
    step = max(2, int(round(max(nx, ny) / 32)))
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    gx = ii + disp[:, :, k, 0]
    gy = jj + disp[:, :, k, 1]
    ax.imshow(sl(warped), cmap="gray", vmin=0.0, vmax=1.0, origin="lower", alpha=0.35,
              interpolation="nearest")
    for i in range(0, nx, step):
        ax.plot(gx[i, :], gy[i, :], color="tab:red", linewidth=0.6)
    for j in range(0, ny, step):
        ax.plot(gx[:, j], gy[:, j], color="tab:red", linewidth=0.6)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_title("deformed grid p + u(p)")

    ax = axes[1, 2]
    jac_slice = sl(jac)
    vmax = max(2.0, float(np.max(jac_slice)))
    vmin = min(0.0, float(np.min(jac_slice)))
    norm = mcolors.TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax)
    shown = ax.imshow(jac_slice, cmap="RdBu_r", norm=norm, origin="lower",
                      interpolation="nearest")
    folded = np.ma.masked_where(jac_slice > 0, np.ones_like(jac_slice))
    ax.imshow(folded, cmap=mcolors.ListedColormap(["black"]), origin="lower",
              interpolation="nearest")
    n_folded = int(np.sum(jac <= 0))
    ax.set_title(f"Jacobian determinant ({n_folded} folded voxels)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)

    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  (slice {k} of axis 2)".strip())
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=100)

    try:
        io.atomic_write(path, write)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def _device_name():
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def register(model, moving_path, fixed_path, out_dir, moving_labels=None, fixed_labels=None,
             figure=True, notes=None, refine_steps=0, refine_lr=None):
    """Registers `moving_path` to `fixed_path` and writes the outputs listed in the module doc.

    Args:
        model: a model from `mdregnet.models.build`/`load`, or a directory written by
            `models.save` (then rebuilt directly for the fixed grid).
        moving_path, fixed_path: NIfTI images. The moving image is resampled onto the fixed grid
            through the affines when the grids differ (the images must share world space, e.g.
            after affine pre-alignment with `mdregnet.preprocess`).
        out_dir: output folder, created if missing; existing outputs of an earlier run are
            replaced, and those this run does not produce (e.g. `warped_labels.nii.gz`) removed.
        moving_labels, fixed_labels: optional label-map paths on the grid of their image.
        figure: write `figure.png`.
        notes: optional sentences to put first in the summary's `notes` (e.g. preprocessing).
        refine_steps: when > 0, refine this pair's velocity field by that many Adam steps on the
            model's own loss (`mdregnet.refine`) and write the refined outputs.
        refine_lr: the refinement's Adam step size (voxels); None: `refine.DEFAULT_LR`.

    Returns:
        The summary dict also written to `summary.json`.

    Raises:
        io.InvalidInputError: an input file is unreadable or invalid (the message names it).
        FileNotFoundError / ValueError: a bad model directory (`models.load`: the message names
            the file) or a model that cannot take the images (or, with `refine_steps`, has no
            velocity field).
        OSError: `out_dir` is not a writable folder (checked first), or an output cannot be
            written (e.g. the disk is full). In every case nothing is left in `out_dir`.
    """
    started = time.perf_counter()
    io.check_output_dir(out_dir)  # fail now, not after the model has run
    source_config, source_dir = model_config(model)
    inputs = _load_inputs(moving_path, fixed_path, moving_labels, fixed_labels)
    fixed_img, moving_img = inputs["fixed_img"], inputs["moving_img"]
    shape = tuple(int(n) for n in inputs["fixed"].shape)
    notes = list(notes or [])

    fixed, fixed_normalised = _to_unit_range(inputs["fixed"], "fixed", notes)
    moving, moving_normalised = _to_unit_range(inputs["moving"], "moving", notes)
    moving_lab = inputs["moving_labels"]
    resampled = not _same_grid(moving_img, fixed_img)
    if resampled:
        moving = resample_to_grid(moving, moving_img.affine, fixed_img.affine, shape, order=1)
        if moving_lab is not None:
            moving_lab = resample_to_grid(moving_lab, moving_img.affine, fixed_img.affine, shape,
                                          order=0)
        notes.append(f"moving image (shape {tuple(moving_img.shape[:3])}) resampled onto the "
                     f"fixed grid {shape} through the affines (trilinear"
                     + ("; labels nearest neighbour)" if moving_lab is not None else ")"))

    fitted, pad, fit_note = fit_model(model, shape)
    if fit_note:
        notes.append(fit_note)
    config = fitted.mdregnet_config
    outputs, seconds = predict(fitted, moving, fixed, pad, refine_steps, refine_lr)
    disp = outputs["disp"]

    fixed_lab = inputs["fixed_labels"]
    brain = None if fixed_lab is None or not np.any(fixed_lab > 0) else fixed_lab > 0
    stats, jac = deformation_stats(disp, mask=brain)
    summary = {
        "model": {"name": config["name"], "directory": source_dir,
                  "saved_input_shape": source_config["input_shape"],
                  "input_shape": config["input_shape"], "hparams": config["hparams"]},
        "moving": os.fspath(moving_path), "fixed": os.fspath(fixed_path),
        "moving_labels": None if moving_labels is None else os.fspath(moving_labels),
        "fixed_labels": None if fixed_labels is None else os.fspath(fixed_labels),
        "shape": list(shape), "moving_shape": [int(n) for n in moving_img.shape[:3]],
        "voxel_size_mm": [float(z) for z in fixed_img.header.get_zooms()[:3]],
        "device": _device_name(),
        "time_s": seconds,
        **stats,
        "resampled": resampled,
        "normalised": {"moving": moving_normalised, "fixed": fixed_normalised},
        "padding": None if not any(b or a for b, a in pad) else [list(p) for p in pad],
        "notes": notes,
        "dice": None,
        "refine": None,
    }
    if "refine" in outputs:
        info = outputs["refine"]
        summary["refine"] = {key: info[key] for key in ("steps", "seconds", "loss_before",
                                                         "loss_after", "lr")}
    if "inverse_disp" in outputs:
        inverse, _ = deformation_stats(outputs["inverse_disp"])
        summary["inverse"] = {"folding": inverse["folding"], "sdlogj": inverse["sdlogj"]}

    volumes = {"warped": outputs["warped"], "disp": disp, "jacobian_det": jac}
    if "inverse_disp" in outputs:
        volumes["inverse_disp"] = outputs["inverse_disp"]
    if moving_lab is not None:
        volumes["warped_labels"] = warp_labels(moving_lab, disp)
        if fixed_lab is not None:
            summary["dice"] = dice_summary(fixed_lab, moving_lab, volumes["warped_labels"])

    def draw_figure(path):
        save_figure(path, fixed, moving, outputs["warped"], disp, jac,
                    title=f"{config['name']}: {os.path.basename(os.fspath(moving_path))} -> "
                          f"{os.path.basename(os.fspath(fixed_path))}")

    return write_outputs(out_dir, volumes, fixed_img, summary,
                         figure=draw_figure if figure else None, started=started)


# ------------------------------------------------------------------------------------------------
# Outputs (shared with mdregnet.cohort)
# ------------------------------------------------------------------------------------------------
def deformation_stats(disp, mask=None, jac=None):
    """Folding, SDlogJ and extremes of one displacement field, from ONE Jacobian determinant.

    The numbers are those of `metrics.folding(disp, mask)` and `metrics.sd_log_jacobian(disp)`
    (same definitions: folded where `det <= 0`; `std(log(clip(det, *metrics.SDLOGJ_CLIP)))`),
    computed from a single determinant instead of one per metric.

    Args:
        disp: `(X, Y, Z, 3)` displacement in voxels (float).
        mask: optional `(X, Y, Z)` bool brain mask (the fixed image's labels > 0), not empty.
        jac: optional precomputed `det(I + grad disp)` `(X, Y, Z)`, e.g. float32 from
            `metrics.jacobian_determinant_tf` (then the numbers agree with the float64 ones to
            float32 round-off); None computes it with `metrics.jacobian_determinant` (float64).

    Returns:
        `(stats, jac32)`: `stats` a dict with 'folding' (count, percent and, with a mask,
        count_in_mask, percent_in_mask), 'sdlogj', 'sdlogj_in_mask' (None without a mask),
        'jacobian' {min, max} and 'max_displacement_vox'; `jac32` the determinant as float32
        `(X, Y, Z)` (what jacobian_det.nii.gz holds).

    Raises:
        ValueError: a field that is not `(X, Y, Z, 3)`, or a mask of another shape.
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"deformation_stats needs a (X, Y, Z, 3) displacement, got {disp.shape}")
    det = metrics.jacobian_determinant(disp) if jac is None else np.asarray(jac, np.float64)
    if det.shape != disp.shape[:-1]:
        raise ValueError(f"jacobian shape {det.shape} does not match the field's "
                         f"{disp.shape[:-1]}")
    jac32 = det.astype(np.float32)
    folded = det <= 0
    fold = {"count": int(folded.sum()), "percent": 100.0 * float(folded.mean())}
    log_det = np.log(np.clip(det, *metrics.SDLOGJ_CLIP))
    sdlogj_in_mask = None
    if mask is not None:
        inside = np.asarray(mask) != 0
        if inside.shape != det.shape:
            raise ValueError(f"mask shape {inside.shape} differs from the field's {det.shape}")
        n_inside = int(inside.sum())
        if n_inside == 0:
            raise ValueError("mask is empty")
        count = int((folded & inside).sum())
        fold["count_in_mask"] = count
        fold["percent_in_mask"] = 100.0 * count / n_inside
        sdlogj_in_mask = float(np.std(log_det[inside]))
    stats = {
        "folding": fold,
        "sdlogj": float(np.std(log_det)),
        "sdlogj_in_mask": sdlogj_in_mask,
        "jacobian": {"min": float(jac32.min()), "max": float(jac32.max())},
        "max_displacement_vox": float(np.sqrt(np.sum(disp ** 2, axis=-1)).max()),
    }
    return stats, jac32


def dice_summary(fixed_labels, moving_labels, warped_labels):
    """Dice of the warped moving labels against the fixed labels, and before registration.

    Args:
        fixed_labels, moving_labels, warped_labels: `(X, Y, Z)` integer label maps on one grid.

    Returns:
        dict 'mean' (over the labels present in `fixed_labels`, background excluded),
        'per_label' {label: Dice}, 'before' (mean Dice of the unwarped moving labels).
    """
    per_label, mean = metrics.dice(fixed_labels, warped_labels)
    _, mean_before = metrics.dice(fixed_labels, moving_labels)
    return {"mean": mean, "per_label": per_label, "before": mean_before}


def write_outputs(out_dir, volumes, fixed_img, summary, files=OUTPUT_FILES, figure=None,
                  started=None):
    """Writes one registration's files and its summary.json into `out_dir`, all or nothing.

    Everything is written into a temporary folder beside `out_dir` (each file through
    `io.atomic_write`) and then moved in, summary.json last (`_publish`): an exception, or an
    interruption, at any point leaves none of this call's files in `out_dir` (a folder it created
    is removed again), and a folder that holds summary.json holds every output listed in it.

    Args:
        out_dir: output folder (created; its parent too).
        volumes: numpy arrays on the fixed grid: 'warped' `(X, Y, Z)` float, 'disp'
            `(X, Y, Z, 3)` voxels, 'jacobian_det' `(X, Y, Z)`, and optionally 'inverse_disp'
            `(X, Y, Z, 3)` voxels and 'warped_labels' `(X, Y, Z)` integers.
        fixed_img: the fixed image (nibabel): every file gets its affine and header.
        summary: dict for summary.json; 'outputs' (name -> final path) and, with `started`,
            'total_time_s' are added. Numpy values are converted (`jsonable`).
        files: the names of `OUTPUT_FILES` to write; each is written when its data is there
            (the `*_itk.nii.gz` exports with their field, figure.png with `figure`);
            summary.json is always written.
        figure: None, or `figure(path)` writing figure.png.
        started: `time.perf_counter()` value the total time is counted from, or None.

    Returns:
        The summary as written (JSON types).

    Raises:
        OSError: `out_dir` is not usable (`io.check_output_dir`) or a file cannot be written
            (e.g. ENOSPC); ValueError: values that do not fit their dtype. The message names the
            final path in `out_dir`. No temporary file or folder is left behind in either case.
    """
    wanted = set(files)
    out_dir = os.path.abspath(os.fspath(out_dir))
    final = {name: os.path.join(out_dir, name) for name in OUTPUT_FILES}
    parent = os.path.dirname(out_dir)
    io.check_output_dir(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as err:
        raise OSError(err.errno, f"{out_dir}: cannot create the output folder "
                                 f"({err.strerror or err})") from err
    written = []
    try:
        def stage(name):
            written.append(name)
            return os.path.join(staging, name)

        affine, header = fixed_img.affine, fixed_img.header
        if "warped.nii.gz" in wanted:
            io.save_volume(stage("warped.nii.gz"), volumes["warped"], affine, header,
                           dtype=np.float32)
        if "disp.nii.gz" in wanted:
            io.save_volume(stage("disp.nii.gz"), volumes["disp"], affine, header,
                           dtype=np.float32)
        if "disp_itk.nii.gz" in wanted:
            io.save_displacement_itk(stage("disp_itk.nii.gz"), volumes["disp"], affine, header)
        if "inverse_disp" in volumes:
            if "inverse_disp.nii.gz" in wanted:
                io.save_volume(stage("inverse_disp.nii.gz"), volumes["inverse_disp"], affine,
                               header, dtype=np.float32)
            if "inverse_disp_itk.nii.gz" in wanted:
                io.save_displacement_itk(stage("inverse_disp_itk.nii.gz"),
                                         volumes["inverse_disp"], affine, header)
        if "jacobian_det.nii.gz" in wanted:
            io.save_volume(stage("jacobian_det.nii.gz"), volumes["jacobian_det"], affine, header,
                           dtype=np.float32)
        if volumes.get("warped_labels") is not None and "warped_labels.nii.gz" in wanted:
            io.save_volume(stage("warped_labels.nii.gz"), volumes["warped_labels"], affine,
                           header, dtype=np.int32)
        if figure is not None and "figure.png" in wanted:
            figure(stage("figure.png"))
        summary["outputs"] = {name: final[name] for name in written + ["summary.json"]}
        if started is not None:
            summary["total_time_s"] = time.perf_counter() - started
        summary = jsonable(summary)
        text = json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"

        def write_json(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        io.atomic_write(stage("summary.json"), write_json)
        _publish(staging, out_dir, written)
    except (OSError, ValueError) as err:
        relocated = io.relocated_error(err, staging, out_dir)
        if relocated is err:
            raise
        raise relocated from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _publish(staging, out_dir, names):
    """Moves `names` from `staging` into `out_dir` (created); all or, on failure, none of them.

    Outputs of an earlier run that this run does not produce are removed, so the folder never
    mixes two registrations.
    """
    io.publish_files(staging, out_dir, names)
    for name in set(OUTPUT_FILES) - set(names):
        stale = os.path.join(out_dir, name)
        if os.path.isfile(stale):
            os.remove(stale)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def set_device(device):
    """Applies --device before any tensor is made: 'cpu' hides every GPU, 'gpu' requires one."""
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    elif device == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise app.UsageError("--device=gpu but TensorFlow sees no GPU (install mdregnet[gpu])")


def default_model_dir():
    """The pretrained model shipped in the package, or a UsageError telling to pass --model."""
    if os.path.isfile(os.path.join(PRETRAINED_DIR, "config.json")):
        return PRETRAINED_DIR
    raise app.UsageError(f"no --model given and no pretrained model is shipped at "
                         f"{PRETRAINED_DIR}; pass --model DIR, a directory written by "
                         "mdregnet.models.save (e.g. by python -m mdregnet.train)")


def _brain_mask_file(image_path, out_path):
    """Writes `image != 0` as a mask (for an image already skull-stripped); returns its path.

    Raises:
        io.InvalidInputError: the image has no zero background (it needs a mask or labels).
    """
    image, img = io.load_image(image_path)
    brain = image != 0
    if brain.all():
        raise io.InvalidInputError(f"{image_path}: --preprocess needs a skull-stripped image "
                                   "(zero background) or a brain mask (--moving_mask / "
                                   "--fixed_mask) or a label map")
    io.save_volume(out_path, brain.astype(np.uint8), img.affine)
    return out_path


def preprocess_pair(moving_path, fixed_path, work_dir, model, template="mni152",
                    moving_labels=None, fixed_labels=None, moving_mask=None, fixed_mask=None):
    """Runs `mdregnet.preprocess` on both images (see the module doc) into `work_dir`.

    Args:
        moving_path, fixed_path: NIfTI images (skull on with a mask or labels, or skull-stripped).
        work_dir: folder for the preprocessed files.
        model: the model (or saved directory) whose input shape sets the output grid's size.
        template: 'mni152' (the shipped MNI152 brain at 2 mm) or a skull-stripped NIfTI.
        moving_labels, fixed_labels, moving_mask, fixed_mask: optional paths on their image's grid.

    Returns:
        `(paths, note)`: `paths` a dict with `moving`, `fixed`, `moving_labels`, `fixed_labels`
        (the preprocessed files; labels None when not given) and `note` a sentence for the
        summary.

    Raises:
        io.InvalidInputError: unreadable inputs, or an image that cannot be skull-stripped.
        RuntimeError: an affine registration fails.
    """
    config, _ = model_config(model)
    template_path = assets.MNI152_TEMPLATE if template == "mni152" else os.fspath(template)
    tmpl = preprocess.load_template(template_path)
    grid = preprocess.target_grid(tmpl, tuple(config["input_shape"]))
    paths, details = {}, []
    for role, image, labels, mask in (("moving", moving_path, moving_labels, moving_mask),
                                      ("fixed", fixed_path, fixed_labels, fixed_mask)):
        if mask is None and labels is None:
            mask = _brain_mask_file(image, os.path.join(work_dir, f"{role}_mask.nii.gz"))
        stats = preprocess.preprocess_subject(image, work_dir, role, label_path=labels,
                                              mask_path=mask, template=tmpl, grid=grid)
        paths[role], paths[f"{role}_labels"] = stats["image"], stats["labels"]
        details.append(f"{role} affine scale {stats['scale']:.3f}"
                       + "".join(f" ({w})" for w in stats["warnings"]))
    note = (f"both images preprocessed (skull strip, normalise, affine to {template_path}, "
            f"resampled onto its {'x'.join(map(str, grid.shape))} grid at "
            f"{'x'.join(f'{z:g}' for z in grid.spacing)} mm): " + "; ".join(details)
            + "; outputs live on that grid")
    return paths, note


def run_from_flags(fv=FLAGS):
    """The command line's work, reading parsed flags `fv`.

    Returns:
        The summary of one registration, or in cohort mode (`--moving_dir` / `--subjects_dir`)
        the `mdregnet.cohort.CohortReport`.
    """
    from mdregnet import cohort  # cohort imports this module

    if cohort.requested(fv):
        return cohort.run_from_flags(fv)
    for name in cohort.COHORT_ONLY_FLAGS:
        if fv[name].present:
            raise app.UsageError(f"--{name} is for cohort mode (--moving_dir with --fixed, or "
                                 "--subjects_dir with --atlas and --atlas_labels)")
    moving, fixed = fv.moving, fv.fixed
    moving_labels, fixed_labels = fv.moving_labels, fv.fixed_labels
    if bool(moving) != bool(fixed):
        raise app.UsageError("give both --moving and --fixed, or neither (the embedded default "
                             "pair)")
    if not moving:
        pair = assets.default_pair()
        moving, fixed = pair.moving, pair.fixed
        moving_labels = moving_labels or pair.moving_labels
        print(f"no --moving/--fixed: registering the embedded default pair, Colin27 "
              f"({moving}) to the MNI152 2009a brain ({fixed})")
    out = fv.out or "mdregnet_out"
    if bool(fv.moving_labels) != bool(fixed_labels):  # the default pair's atlas needs no note
        print("note: Dice needs both --moving_labels and --fixed_labels; "
              + ("warping the moving labels only" if moving_labels else
                 "the fixed labels give the brain mask for folding only"))
    set_device(fv.device)
    model_dir = fv.model or default_model_dir()
    with tempfile.TemporaryDirectory(prefix="mdregnet_preprocess_") as work:
        notes = []
        if fv.preprocess:
            paths, note = preprocess_pair(moving, fixed, work, model_dir, template=fv.template,
                                          moving_labels=moving_labels,
                                          fixed_labels=fixed_labels, moving_mask=fv.moving_mask,
                                          fixed_mask=fv.fixed_mask)
            moving, fixed = paths["moving"], paths["fixed"]
            moving_labels, fixed_labels = paths["moving_labels"], paths["fixed_labels"]
            notes.append(note)
        summary = register(model_dir, moving, fixed, out, moving_labels=moving_labels,
                           fixed_labels=fixed_labels, figure=fv.figure, notes=notes,
                           refine_steps=fv.refine_steps, refine_lr=fv.refine_lr)
    for note in summary["notes"]:
        print(f"note: {note}")
    fold = summary["folding"]
    print(f"registered {summary['moving']} -> {summary['fixed']} with {summary['model']['name']} "
          f"in {summary['time_s']:.2f} s; folding {fold['count']} voxels "
          f"({fold['percent']:.4f}%), SDlogJ {summary['sdlogj']:.4f}")
    if summary["refine"] is not None:
        ref = summary["refine"]
        print(f"refined with {ref['steps']} Adam steps (lr {ref['lr']:g}) in "
              f"{ref['seconds']:.2f} s: loss {ref['loss_before']:.4f} -> {ref['loss_after']:.4f}")
    if summary["dice"] is not None:
        print(f"Dice mean {summary['dice']['mean']:.4f} (before registration "
              f"{summary['dice']['before']:.4f})")
    print(f"outputs in {os.path.abspath(out)}:")
    for name in sorted(summary["outputs"]):
        print(f"  {summary['outputs'][name]}")
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mdregnet import cohort

    import tensorflow as tf

    from mdregnet import train

    try:
        result = run_from_flags(FLAGS)
    except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as err:  # multi-worker: another worker is gone
        print(f"mdregnet.infer: error: lost contact with the cluster ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}); every finished subject is complete: rerun "
              "the same command on every worker to do the rest", file=sys.stderr, flush=True)
        sys.exit(train.EXIT_WORKER_LOST)
    except (OSError, ValueError) as err:  # io.InvalidInputError is a ValueError
        sys.exit(f"mdregnet.infer: error: {' '.join(str(err).split())}")
    if isinstance(result, cohort.CohortReport) and result.n_failed:
        sys.exit(f"mdregnet.infer: {result.n_failed} of {len(result.rows)} subjects failed "
                 f"(see {result.csv_path})")


if __name__ == "__main__":
    define_flags()
    app.run(main)
