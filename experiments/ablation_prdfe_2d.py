"""PRDFE's Table I on simulated 2D data: VoxelMorph, PDFE, IPRDFE and PRDFE against a KNOWN
deformation, image MSE and deformation-field MSE.

    python experiments/ablation_prdfe_2d.py [--slices_dir ../shared/data/slices2d] [--size 64] \
        [--steps 2000] [--batch_size 4] [--lr 1e-3] [--test_per_image 40] \
        [--methods voxelmorph,pdfe,iprdfe,prdfe] \
        [--lams voxelmorph=0.001,pdfe=0.001,iprdfe=0.01,prdfe=0.05] [--out experiments/results]

What the paper did (Zhou et al., `../shared/papers/prdfe.md`, Sec. III-A1, III-B1, IV-A, Table I):
10 kinds of textured geometric figures, 128x128, intensities in [0, 1], each warped by "affine +
non-linear deformation fields" generated with SyN; 2000 training and 500 test images; every method
trained with MSE + lam * Grad_l2 (VoxelMorph-2 "with MSE loss", Adam, lr 1e-4, batch 4, 1 h on a
GPU), lam chosen per method for the best image MSE (0.001 VoxelMorph, 0.001 PDFE, 0.01 IPRDFE,
0.05 PRDFE). Table I: MSE between the warped moving and the fixed image, and MSE between the
estimated and the known deformation field, mean ± std over the test images (Fig. 5 splits them
into small, median and large deformations).

Here (the substitutions, each a flag):
- Images: the 8 real 2D brain slices of `slices2d` (6 ANTsPy slices `ants/*.jpg`, 256x256, and 2
  OASIS slices `oasis/*/slice_norm.nii.gz`, 160x192 zero-padded to 192x192), resized to
  `--size`^2, in [0, 1]. `--test_images` (default `r85slice` and `oasis002`) are held out: the
  test triples are made from them only, so the test images are unseen in training.
- Known deformation (`random_deformation`): the paper's "affine + non-linear" as the sum of an
  affine displacement about the image centre (rotation, anisotropic scale, shear, translation)
  and a smooth random field (white noise per component, Gaussian-filtered, scaled to a given
  maximum length). One random "level" in [0, 1] per triple scales both parts, so tertiles of
  the level are the paper's small / median / large deformations (Fig. 5). At level 1: rotation
  up to 10 degrees, scale +-10 %, shear +-0.05, translation up to 5 % of the size, non-linear
  part up to 6 % of the size (about 4 px at 64, 8 px at 128).
- Triple: moving = a slice (randomly flipped left-right), fixed = moving warped by the known
  field `u_g` (`fixed(p) = moving(p + u_g(p))`, bilinear, 0 outside; `mdregnet.layers.warp`,
  the warp of every model here), so the ground truth of each model's `disp` is `u_g` (both in
  pixels of the fixed grid, the package convention). Training triples are drawn afresh at every
  step from the training slices; the test triples are fixed by `--seed`.
- Models: the registry's `voxelmorph` with `similarity="mse"`, `bidirectional=False`,
  `int_steps=0` and `int_downsize=1` (the displacement-field VoxelMorph-2 of the CVPR paper that
  PRDFE was built on, not the diffeomorphic variant), and `pdfe`, `iprdfe`, `prdfe`, whose
  objective is already the paper's eq. 5 (MSE + lam Grad_l2 of the final field). The same
  channels for every method (`--enc_features`, `--dec_features`; default VoxelMorph-2's
  [16, 32, 32, 32] / [32, 32, 32, 32, 32, 16, 16]; the paper's simulated-data channels read as
  `--enc_features 144,160,160,160 --dec_features 160,160,160,160,160,144,144`).
- Metrics: image MSE `mean((warped - fixed)^2)`; deformation MSE `mean((u - u_g)^2)` over the
  pixels and both components (px^2), over the whole grid (the paper's) and inside the fixed
  image's foreground (intensity > 0.05: outside it the field is not observable); mean end-point
  error `mean |u - u_g|` (px); folding % (det(I + grad u) <= 0).

CPU defaults: 64x64 images, 2000 steps of batch 4 per method with Adam lr 1e-3 (10x the paper's,
for the short budget), 80 test triples. Paper's protocol: `--size 128 --lr 1e-4 --steps <1 h of
GPU> --test_per_image 250` with the paper's channels; the images remain brain slices rather than
the paper's geometric figures.
Writes `ablation_prdfe_2d.md` and `.json` into `--out`.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation_common as common  # noqa: E402
from mdregnet import metrics  # noqa: E402

FLAGS = flags.FLAGS

METHODS = ("voxelmorph", "pdfe", "iprdfe", "prdfe")
TITLES = {"identity": "no registration", "voxelmorph": "VoxelMorph",
          "pdfe": "VoxelMorph with PDFE", "iprdfe": "VoxelMorph with IPRDFE",
          "prdfe": "VoxelMorph with PRDFE"}
#: Sec. IV-A: lambda with the best image MSE on the simulated data, per method.
PAPER_LAMS = {"voxelmorph": 0.001, "pdfe": 0.001, "iprdfe": 0.01, "prdfe": 0.05}
#: Table I of the paper (mean, std over its 500 simulated test images).
PAPER_TABLE = {"image_mse": {"voxelmorph": (0.0051, 0.0030), "pdfe": (0.0030, 0.0020),
                             "iprdfe": (0.0011, 0.0011), "prdfe": (0.0006, 0.0007)},
               "deformation_mse": {"voxelmorph": (132.2309, 83.0509),
                                   "pdfe": (138.4297, 90.0017), "iprdfe": (6.0331, 6.5563),
                                   "prdfe": (3.1005, 4.8268)}}
#: VoxelMorph-2 of the CVPR paper with MSE loss: a displacement field, one direction.
VOXELMORPH_MSE = {"similarity": "mse", "bidirectional": False, "int_steps": 0,
                  "int_downsize": 1, "penalty": "l2"}
#: Simulation at level 1 (fractions of the image size where marked).
DEFORMATION = {"max_rotation_deg": 10.0, "max_scale": 0.10, "max_shear": 0.05,
               "max_translation": 0.05, "max_nonlinear": 0.06, "smooth_sigma": 0.08}
FOREGROUND = 0.05
DEFAULT_TEST_IMAGES = ("r85slice", "oasis002")


def define_flags(flag_values=FLAGS):
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("slices_dir", os.path.join(os.path.dirname(common.REPO), "shared", "data",
                                                   "slices2d"),
                        "Folder with ants/*.jpg and oasis/*/slice_norm.nii.gz.", **fv)
    flags.DEFINE_integer("size", 64, "Image size (square; divisible by 16). Paper: 128.", **fv)
    flags.DEFINE_list("test_images", list(DEFAULT_TEST_IMAGES), "Slices held out for the test "
                      "triples (names: the jpg stem, or oasis<subject>).", **fv)
    flags.DEFINE_integer("steps", 2000, "Training steps per method (paper: 1 h on a GPU).",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("batch_size", 4, "Triples per step (paper: 4).", lower_bound=1, **fv)
    flags.DEFINE_float("lr", 1e-3, "Adam learning rate (paper: 1e-4; 10x larger by default for "
                       "the short CPU budget).", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights, the training stream and the test set.",
                         **fv)
    flags.DEFINE_integer("test_per_image", 40, "Test triples per held-out slice.", lower_bound=1,
                         **fv)
    flags.DEFINE_list("methods", list(METHODS), "Methods in table order.", **fv)
    flags.DEFINE_list("lams", [f"{k}={v:g}" for k, v in PAPER_LAMS.items()], "lambda per method "
                      "(name=value; paper's choices by default).", **fv)
    flags.DEFINE_list("enc_features", ["16", "32", "32", "32"], "Encoder channels (VoxelMorph, "
                      "PDFE, PRDFE; 4 values, K = 5 levels).", **fv)
    flags.DEFINE_list("dec_features", ["32", "32", "32", "32", "32", "16", "16"], "Decoder "
                      "channels of every method (7 values).", **fv)
    flags.DEFINE_string("out", "experiments/results", "Folder of ablation_prdfe_2d.md/.json.",
                        **fv)
    flags.DEFINE_integer("log_every", 100, "Steps between progress lines.", **fv)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _square(image):
    """Zero-pads a 2D image to a centred square."""
    h, w = image.shape
    n = max(h, w)
    out = np.zeros((n, n), np.float32)
    out[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = image
    return out


def _resize(image, size):
    from scipy import ndimage

    out = ndimage.zoom(image, size / image.shape[0], order=1, grid_mode=True, mode="grid-mirror")
    return np.clip(out[:size, :size], 0.0, 1.0).astype(np.float32)


def load_slices(folder, size):
    """The real 2D slices of `folder`, `{name: (size, size) float32 in [0, 1]}`, sorted by name.

    `ants/<name>.jpg` (grey or RGB, 0-255) and `oasis/<subject>slice/slice_norm.nii.gz`
    (named `oasis<subject>`); each is zero-padded to a square, resized (bilinear) and scaled to
    a maximum of 1.

    Raises:
        FileNotFoundError: no slices in `folder`.
    """
    from matplotlib import image as mpimg

    found = {}
    ants_dir = os.path.join(folder, "ants")
    if os.path.isdir(ants_dir):
        for name in sorted(os.listdir(ants_dir)):
            if name.lower().endswith((".jpg", ".jpeg", ".png")):
                pixels = np.asarray(mpimg.imread(os.path.join(ants_dir, name)), np.float32)
                if pixels.ndim == 3:
                    pixels = pixels[..., :3].mean(axis=-1)
                found[os.path.splitext(name)[0]] = pixels
    oasis_dir = os.path.join(folder, "oasis")
    if os.path.isdir(oasis_dir):
        import nibabel as nib

        for sub in sorted(os.listdir(oasis_dir)):
            path = os.path.join(oasis_dir, sub, "slice_norm.nii.gz")
            if os.path.isfile(path):
                pixels = np.asarray(nib.load(path).dataobj, np.float32)
                found["oasis" + sub.replace("slice", "")] = pixels.reshape(pixels.shape[:2])
    if not found:
        raise FileNotFoundError(f"{folder}: no 2D slices (ants/*.jpg, oasis/*/slice_norm.nii.gz)")
    out = {}
    for name, pixels in sorted(found.items()):
        pixels = _square(pixels - pixels.min())
        pixels = pixels / max(float(pixels.max()), 1e-6)
        out[name] = _resize(pixels, size)
    return out


# ------------------------------------------------------------------------------------------------
# Simulation
# ------------------------------------------------------------------------------------------------
def random_deformation(rng, shape, level, params=None):
    """A known smooth "affine + non-linear" displacement field (pixels), 2D or 3D.

    `u(p) = (A - I)(p - c) + t + n(p)`: `A` a rotation (2D; about the first two axes in 3D)
    times an upper-triangular scale/shear matrix, `c` the grid centre, `t` a translation, and
    `n` white noise per component filtered by a Gaussian of sigma `smooth_sigma * size` and
    scaled to a maximum length of `level * U(0.5, 1) * max_nonlinear * size`. Rotation, scale
    deviations, shear and translation are `level * U(-1, 1)` times their maxima.

    Args:
        rng: `numpy.random.Generator`.
        shape: spatial shape `(X, Y)` or `(X, Y, Z)`.
        level: deformation strength in [0, 1] (0: the identity).
        params: dict overriding `DEFORMATION`.

    Returns:
        `(*shape, ndims)` float32 displacement, component c along array axis c, in pixels; the
        transform is `phi(p) = p + u(p)` and warping pulls back (`warped(p) = image(phi(p))`).
    """
    from scipy import ndimage

    p = dict(DEFORMATION, **(params or {}))
    shape = tuple(int(n) for n in shape)
    ndims = len(shape)
    size = float(min(shape))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"), axis=-1)
    centre = (np.asarray(shape, np.float64) - 1.0) / 2.0

    def uniform():
        return level * rng.uniform(-1.0, 1.0)

    angle = np.deg2rad(p["max_rotation_deg"] * uniform())
    rot = np.eye(ndims)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    shear = np.eye(ndims)
    for a in range(ndims):
        shear[a, a] = 1.0 + p["max_scale"] * uniform()
        for b in range(a + 1, ndims):
            shear[a, b] = p["max_shear"] * uniform()
    matrix = rot @ shear
    translation = np.asarray([p["max_translation"] * size * uniform() for _ in range(ndims)])
    affine = (grid - centre) @ (matrix - np.eye(ndims)).T + translation

    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape),
                                              p["smooth_sigma"] * size, mode="reflect")
                      for _ in range(ndims)], axis=-1)
    length = np.sqrt((noise ** 2).sum(axis=-1)).max()
    magnitude = level * rng.uniform(0.5, 1.0) * p["max_nonlinear"] * size
    nonlinear = noise * (magnitude / max(length, 1e-12))
    return (affine + nonlinear).astype(np.float32)


def warp_images(images, disps):
    """`images (B, *spatial)` warped by `disps (B, *spatial, ndims)`: `out(p) = image(p + u(p))`,
    bilinear, 0 outside (`mdregnet.layers.warp`). Returns float32 `(B, *spatial)`."""
    from mdregnet import layers

    out = layers.warp(np.asarray(images, np.float32)[..., None], np.asarray(disps, np.float32))
    return np.asarray(out)[..., 0]


def simulate(rng, images, count, params=None, flip=True):
    """`count` simulated triples from random slices of `images` (list of 2D arrays).

    Returns:
        dict with 'moving', 'fixed' `(count, *spatial)` float32, 'disp' `(count, *spatial,
        ndims)` (the ground truth: `fixed = warp(moving, disp)`), 'level' `(count,)` and
        'source' `(count,)` indices into `images`.
    """
    source = rng.integers(len(images), size=count)
    levels = rng.uniform(0.0, 1.0, size=count)
    moving = np.stack([images[i] for i in source]).astype(np.float32)
    if flip:
        flips = rng.uniform(size=count) < 0.5
        moving[flips] = moving[flips][:, :, ::-1]
    disp = np.stack([random_deformation(rng, moving.shape[1:], lv, params) for lv in levels])
    return {"moving": moving, "fixed": warp_images(moving, disp), "disp": disp,
            "level": levels, "source": source}


def training_batches(rng, images, batch_size, params=None):
    """Endless `(moving, fixed)` batches `(B, *spatial, 1)` of fresh simulated triples."""
    while True:
        triple = simulate(rng, images, batch_size, params)
        yield triple["moving"][..., None], triple["fixed"][..., None]


# ------------------------------------------------------------------------------------------------
# Methods and scores
# ------------------------------------------------------------------------------------------------
def method_hparams(method, lam, enc_features, dec_features):
    """The registry hyper-parameters of `method` for this experiment."""
    hp = {"lam": float(lam), "dec_features": [int(f) for f in dec_features]}
    if method == "voxelmorph":
        hp.update(VOXELMORPH_MSE, enc_features=[int(f) for f in enc_features])
    elif method in ("pdfe", "prdfe"):
        hp["enc_features"] = [int(f) for f in enc_features]
    elif method != "iprdfe":
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    return hp


def score(warped, disp, fixed, truth):
    """Per-triple metrics of predicted `warped (N, *sp)` and `disp (N, *sp, d)` against the
    `fixed` images and the known fields `truth`; dict name -> `(N,)` array."""
    err = np.asarray(disp, np.float64) - np.asarray(truth, np.float64)
    sq = err ** 2
    fg = np.asarray(fixed) > FOREGROUND
    axes = tuple(range(1, fixed.ndim))
    n_fg = np.maximum(fg.sum(axis=axes), 1)
    return {
        "image_mse": np.mean((np.asarray(warped, np.float64) - fixed) ** 2, axis=axes),
        "deformation_mse": sq.mean(axis=axes + (fixed.ndim,)),
        "deformation_mse_foreground": (sq.mean(axis=-1) * fg).sum(axis=axes) / n_fg,
        "endpoint_error": np.sqrt(sq.sum(axis=-1)).mean(axis=axes),
        "folding_percent": np.asarray([metrics.folding(d)["percent"] for d in disp]),
    }


def predict(model, moving, fixed, batch=16):
    """`(warped, disp)` of `model` on all test triples (`training=False`), numpy."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def call(m, f):
        out = model([m, f], training=False)
        return out["warped"], out["disp"]

    warped, disp = [], []
    for start in range(0, len(moving), batch):
        w, d = call(tf.constant(moving[start:start + batch, ..., None]),
                    tf.constant(fixed[start:start + batch, ..., None]))
        warped.append(np.asarray(w)[..., 0])
        disp.append(np.asarray(d))
    return np.concatenate(warped), np.concatenate(disp)


METRIC_KEYS = ("image_mse", "deformation_mse", "deformation_mse_foreground", "endpoint_error",
               "folding_percent")
CATEGORIES = (("small", 0.0, 1 / 3), ("median", 1 / 3, 2 / 3), ("large", 2 / 3, 1.0 + 1e-9))


def summarise(per_triple, levels):
    """Mean/std of every metric overall and per deformation category (level tertiles)."""
    out = {key: common.stat(per_triple[key]) for key in METRIC_KEYS}
    out["by_category"] = {}
    for name, lo, hi in CATEGORIES:
        sel = (levels >= lo) & (levels < hi)
        out["by_category"][name] = {key: common.stat(np.asarray(per_triple[key])[sel])
                                    for key in ("image_mse", "deformation_mse")}
    return out


def run(train_images, test, methods, lams, enc_features, dec_features, steps, batch_size, lr,
        seed, log=print, log_every=100):
    """Trains every method on fresh simulated triples and scores it on `test`.

    Returns:
        dict method -> {'hparams', 'train' (see `common.train_variant`), 'summary', 'per_triple'},
        with 'identity' (no registration: warped = moving, disp = 0) first.
    """
    results = {}
    zero = np.zeros_like(test["disp"])
    per = score(test["moving"], zero, test["fixed"], test["disp"])
    results["identity"] = {"hparams": None, "train": None,
                           "summary": summarise(per, test["level"]),
                           "per_triple": {k: v.tolist() for k, v in per.items()}}
    shape = test["moving"].shape[1:]
    for method in methods:
        hp = method_hparams(method, lams[method], enc_features, dec_features)
        batches = training_batches(np.random.default_rng([seed, 1]), train_images, batch_size)
        model, info = common.train_variant(method, shape, hp, batches, steps, lr=lr, seed=seed,
                                           log=log, log_every=log_every)
        warped, disp = predict(model, test["moving"], test["fixed"])
        per = score(warped, disp, test["fixed"], test["disp"])
        summary = summarise(per, test["level"])
        results[method] = {"hparams": model.mdregnet_config["hparams"], "train": info,
                           "summary": summary,
                           "per_triple": {k: v.tolist() for k, v in per.items()}}
        log(f"{method}: image MSE {summary['image_mse']['mean']:.5f}, deformation MSE "
            f"{summary['deformation_mse']['mean']:.3f} px^2, trained in {info['seconds']:.0f} s")
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def table_one(results):
    """Table I layout: metrics as rows, methods as columns (mean ± std over test triples)."""
    names = list(results)
    rows = []
    for key, title, digits in (("image_mse", "Image intensity MSE", 5),
                               ("deformation_mse", "Deformation field MSE (px², grid)", 3),
                               ("deformation_mse_foreground",
                                "Deformation field MSE (px², fixed foreground)", 3),
                               ("endpoint_error", "Mean end-point error (px)", 3),
                               ("folding_percent", "Folding % (det <= 0)", 3)):
        rows.append([title] + [common.fmt_stat(results[n]["summary"][key], digits)
                               for n in names])
    return common.markdown_table([""] + [TITLES[n] for n in names], rows)


def category_table(results):
    names = list(results)
    rows = []
    for key, digits in (("image_mse", 5), ("deformation_mse", 3)):
        for cat, _, _ in CATEGORIES:
            rows.append([f"{key.replace('_', ' ')} ({cat})"]
                        + [common.fmt_stat(results[n]["summary"]["by_category"][cat][key],
                                           digits) for n in names])
    return common.markdown_table([""] + [TITLES[n] for n in names], rows)


def paper_table(methods):
    rows = []
    for key, title in (("image_mse", "Image intensity MSE"),
                       ("deformation_mse", "Deformation field MSE")):
        rows.append([title] + [f"{PAPER_TABLE[key][m][0]:g} ± {PAPER_TABLE[key][m][1]:g}"
                               for m in methods if m in PAPER_TABLE[key]])
    return common.markdown_table([""] + [TITLES[m] for m in methods if m in PAPER_LAMS], rows)


def markdown(results, settings):
    s = settings
    methods = [m for m in results if m != "identity"]
    lam_text = ", ".join(f"{m} {s['lams'][m]:g}" for m in methods)
    lines = [
        "# PRDFE Table I on simulated 2D data: VoxelMorph vs PDFE vs IPRDFE vs PRDFE",
        "",
        f"Real brain slices resized to {s['size']}x{s['size']}: {len(s['train_images'])} for "
        f"training ({', '.join(s['train_images'])}), {len(s['test_images'])} held out for "
        f"testing ({', '.join(s['test_images'])}), {s['n_test']} test triples "
        f"({s['test_per_image']} per held-out slice on average, seed {s['seed']}). Each triple: "
        "moving = a slice, fixed = moving warped by a known random affine + smooth non-linear "
        "displacement (`random_deformation`; level ~ U(0, 1), at level 1 rotation <= "
        f"{DEFORMATION['max_rotation_deg']:g}°, scale ±{DEFORMATION['max_scale']:.0%}, "
        f"translation <= {DEFORMATION['max_translation']:.0%} and non-linear part <= "
        f"{DEFORMATION['max_nonlinear']:.0%} of the size). Every method: MSE + λ Grad_l2 "
        f"(the paper's λ per method: {lam_text}), "
        f"{s['steps']} steps of batch {s['batch_size']} freshly simulated triples, Adam lr "
        f"{s['lr']:g}, channels enc {s['enc_features']} / dec {s['dec_features']}. VoxelMorph "
        "is the registry's `voxelmorph` with `similarity='mse'`, one direction, no integration "
        "(VoxelMorph-2 with MSE loss, as the paper's baseline).",
        "",
        common.cpu_budget_sentence(s["steps"], "budget (1 h of GPU training per method on "
                                               "2000 images of 128x128)"),
        "",
        "## Table I (mean ± std over the test triples)",
        "",
        table_one(results),
        "",
        "Deformation MSE: mean over pixels and both components of (u − u_g)², in px² of the "
        f"{s['size']}-pixel grid (the paper's grid is 128). Over the grid it includes the "
        "background, where the field cannot be observed; the foreground row keeps the pixels "
        f"where the fixed image is > {FOREGROUND}.",
        "",
        "## By deformation size (paper Fig. 5): tertiles of the simulation level",
        "",
        category_table(results),
        "",
        "## The paper's Table I (128x128 geometric figures, for reference)",
        "",
        paper_table(methods),
        "",
        "## Run",
        "",
        f"- machine: {s['machine']}",
        "- training time per method: " + ", ".join(
            f"{m} {results[m]['train']['seconds']:.0f} s "
            f"({common.fmt(results[m]['train']['seconds_per_step'], 3)} s/step, "
            f"{results[m]['train']['parameters']:,} parameters)" for m in methods),
        f"- total wall time: {s['wall_seconds'] / 60:.1f} min, finished {s['finished']}",
        f"- command: `{s['command']}`",
        "- closer to the paper: `--size 128 --lr 1e-4 --enc_features 144,160,160,160 --dec_features "
        "160,160,160,160,160,144,144 --test_per_image 250 --steps 20000` (GPU)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def parse_lams(values, methods):
    lams = dict(PAPER_LAMS)
    for item in values:
        if "=" not in item:
            raise ValueError(f"--lams entries must be method=value, got {item!r}")
        name, value = item.split("=", 1)
        lams[name.strip()] = float(value)
    missing = [m for m in methods if m not in lams]
    if missing:
        raise ValueError(f"--lams has no value for {missing}")
    return lams


def make_test_set(slices, test_names, per_image, seed):
    images = [slices[n] for n in test_names]
    return simulate(np.random.default_rng([seed, 2]), images, per_image * len(images))


def run_from_flags(fv=FLAGS, argv=None, log=print):
    """The script's work from parsed flags; returns `(results, settings, paths)`."""
    started = time.perf_counter()
    if fv.size % 16:
        raise ValueError(f"--size must be divisible by 16 (K = 5 pyramid levels), got {fv.size}")
    methods = [m.strip() for m in fv.methods if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; one of {METHODS}")
    lams = parse_lams(fv.lams, methods)
    machine = common.machine()
    slices = load_slices(fv.slices_dir, fv.size)
    test_names = [n for n in fv.test_images if n]
    unknown = [n for n in test_names if n not in slices]
    if unknown:
        raise ValueError(f"--test_images {unknown} not among the slices {sorted(slices)}")
    train_names = [n for n in slices if n not in test_names]
    if not train_names or not test_names:
        raise ValueError("need at least one training and one test slice")
    test = make_test_set(slices, test_names, fv.test_per_image, fv.seed)
    log(f"{len(train_names)} training slices, {len(test['moving'])} test triples of "
        f"{fv.size}x{fv.size}")
    results = run([slices[n] for n in train_names], test, methods, lams, fv.enc_features,
                  fv.dec_features, fv.steps, fv.batch_size, fv.lr, fv.seed, log=log,
                  log_every=fv.log_every)
    settings = {"slices_dir": os.path.abspath(fv.slices_dir), "size": fv.size,
                "train_images": train_names, "test_images": test_names,
                "test_per_image": fv.test_per_image, "n_test": int(len(test["moving"])),
                "methods": methods, "lams": lams, "steps": fv.steps,
                "batch_size": fv.batch_size, "lr": fv.lr, "seed": fv.seed,
                "enc_features": [int(f) for f in fv.enc_features],
                "dec_features": [int(f) for f in fv.dec_features],
                "deformation": DEFORMATION, "foreground_threshold": FOREGROUND,
                "machine": machine, "wall_seconds": time.perf_counter() - started,
                "finished": common.timestamp(), "command": common.command_line(argv),
                "paper_table": PAPER_TABLE}
    text = markdown(results, settings)
    payload = {"settings": settings, "test_levels": test["level"].tolist(),
               "results": results}
    paths = common.write_report(common.resolve(fv.out), "prdfe_2d", text, payload)
    print(text)
    log(f"wrote {paths[0]} and {paths[1]}")
    return results, settings, paths


main = common.absl_main("ablation_prdfe_2d", run_from_flags, FLAGS)

if __name__ == "__main__":
    define_flags()
    app.run(main)
