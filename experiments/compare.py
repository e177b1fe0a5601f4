"""One table comparing registration methods on the SAME validation pairs: Dice, folding, runtime.

    python experiments/compare.py [--data_dir work_data/ixi_2mm] \
        [--subjects experiments/splits/ixi_val.txt] [--template_seed 0] \
        [--methods affine,syn,models] [--models name=dir,name=dir] [--max_pairs N] \
        [--syn_metric CC] [--syn_sampling R] [--syn_iterations 40,20,0] [--syn_threads 2] \
        [--refine_steps 0,50] [--device auto] [--out results/compare]

Protocol: that of `mdregnet.evaluate`. One template chosen at random (seeded,
`evaluate.choose_template`) is the FIXED image and every other subject is MOVING (in the order of
`--subjects`, the first `--max_pairs` of them). Each method gives a displacement `disp`
`(X, Y, Z, 3)` in voxels of the fixed grid, `warped(p) = moving(p + disp(p))` (CONVENTIONS.md);
the moving label map is warped by nearest neighbour (`infer.warp_labels`, one code path for every
method) and Dice is computed over the template's labels (`metrics.dice`); folding voxels
(det(I + grad u) <= 0) over the grid and inside the template's brain mask (labels > 0), and
SDlogJ, come from `metrics`. The metric code is `mdregnet.evaluate`'s own.

Methods (`--methods`, comma separated, in table order):
- `affine`: the identity. The data were already affinely aligned to the template by
  `mdregnet.preprocess`, so a zero displacement gives the Dice before deformable registration,
  no folding, and a runtime of 0 (nothing is computed: the affine cost was paid in preprocessing).
- `syn`: ANTs SyN through antspyx (`pip install mdregnet[compare]`), an optional dependency:
  without it the row says "not installed" and the rest runs. Settings: see `SYN_SETTINGS`.
  Runtime: the `ants.registration` call (CPU, `--syn_threads` ITK threads), which includes ANTs
  writing its transform files into a temporary folder.
- `models`: every saved model of `--models` (default the two shipped IXI models; a missing
  directory is skipped with a message), or one of them by name. Run by `evaluate.evaluate`
  (`infer.fit_model` + `infer.predict`): runtime = the model call after one warm-up call, on the
  device TensorFlow uses (`--device`).

Outputs in `--out`, each written atomically (`mdregnet.io.atomic_write`):
    compare.csv   one row per (method, moving subject): Dice, Dice before registration, folding
                  count and % (grid, brain mask), SDlogJ (grid, brain mask), time
    compare.md    the Markdown table (method | Dice | folding % | folding voxels | SDlogJ | time),
                  the exact command line and the settings
    compare.json  the settings, per method its status and the mean/std over pairs of every metric
                  (and per label Dice), and the rows
"""

import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings

import numpy as np
from absl import app, flags

from mdregnet import data, evaluate, infer, io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

DEFAULT_MODELS = ("mdregnet=mdregnet/pretrained/mdregnet_ixi2mm,"
                  "voxelmorph=mdregnet/pretrained/voxelmorph_ixi2mm")

#: Columns of compare.csv: the method, then `evaluate.PAIR_COLUMNS` (forward direction).
CSV_COLUMNS = ("method",) + evaluate.PAIR_COLUMNS

#: Environment variable read by ITK (hence ANTs) when its thread pool starts, once per process.
ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"

# ANTs SyN settings. The images are affinely pre-aligned by mdregnet.preprocess, so the
# deformable stage runs alone ("SyNOnly": no rigid/affine stage, identity initial transform).
# Everything else is antspyx's `ants.registration` default, so the baseline is "ANTs as shipped":
# SyN[gradient step 0.2 mm, update-field sigma 3 voxels, total-field sigma 0], iterations
# 40x20x0 at shrink factors 4x2x1 with smoothing sigmas 2x1x0 voxels (so the full-resolution
# level does not iterate), convergence [1e-7, window 8]. The one change is the similarity metric:
# cross-correlation (CC), the choice of the ANTs SyN baselines in VoxelMorph/MDReg-Net-type
# comparisons (Avants et al. 2008; Balakrishnan et al. 2019) instead of antspyx's default
# Mattes MI. For CC the metric's "sampling" parameter is its neighbourhood radius, and antspyx's
# default of 32 is meant as Mattes histogram bins, so CC gets radius 4 voxels (the radius of
# ANTs' SyNCC preset and antsRegistrationSyN.sh); the other metrics keep antspyx's 32.
SYN_TRANSFORM = "SyNOnly"
SYN_ITERATIONS = (40, 20, 0)
SYN_DEFAULT_SAMPLING = {"CC": 4}
SYN_OTHER_SAMPLING = 32
SYN_FIXED_SETTINGS = {"grad_step": 0.2, "flow_sigma": 3, "total_sigma": 0}
SYN_METRICS = ("CC", "mattes", "meansquares", "demons")

_itk_threads = None  # ITK thread count fixed by the first registration of this process


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags on `flag_values` (called under `__main__` and by tests)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", "work_data/ixi_2mm", "Preprocessed dataset: "
                        "images/<id>.nii.gz and labels/<id>.nii.gz (default relative to the "
                        "repository root).", **fv)
    flags.DEFINE_string("subjects", "experiments/splits/ixi_val.txt", "File listing the subject "
                        "ids ('#' comments); 'all' for every subject in data_dir.", **fv)
    flags.DEFINE_integer("template_seed", 0, "Seed of the template choice "
                         "(evaluate.choose_template).", **fv)
    flags.DEFINE_list("methods", ["affine", "syn", "models"], "Methods in table order: affine, "
                      "syn, models (every --models entry) or a --models name.", **fv)
    flags.DEFINE_string("models", DEFAULT_MODELS, "Saved models as name=dir,name=dir (default "
                        "directories relative to the repository root); missing ones skipped.",
                        **fv)
    flags.DEFINE_integer("max_pairs", None, "Register only the first N moving subjects (quick "
                         "runs).", **fv)
    flags.DEFINE_string("out", "results/compare", "Output directory (created).", **fv)
    flags.DEFINE_enum("syn_metric", "CC", list(SYN_METRICS), "Similarity metric of ANTs SyN.",
                      **fv)
    flags.DEFINE_integer("syn_sampling", None, "Metric parameter of SyN: CC radius (default 4) "
                         "or histogram bins of mattes (default 32).", **fv)
    flags.DEFINE_list("syn_iterations", [str(n) for n in SYN_ITERATIONS], "SyN iterations per "
                      "level, coarse to fine (shrink factors 2^(L-1)..1; antspyx default "
                      "40,20,0 leaves the full resolution out).", **fv)
    flags.DEFINE_integer("syn_threads", 2, f"ITK threads of ANTs ({ITK_THREADS_ENV}).", **fv)
    flags.DEFINE_list("refine_steps", ["0"], "Per model, one row per value: 0 the network alone, "
                      "k > 0 the network plus k test-time refinement steps (mdregnet.refine).",
                      **fv)
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Device of the models: cpu "
                      "hides every GPU; gpu fails when none is visible.", **fv)


# ------------------------------------------------------------------------------------------------
# ANTs SyN (optional dependency)
# ------------------------------------------------------------------------------------------------
def import_ants():
    """`(ants, None)`, or `(None, reason)` when antspyx cannot be imported ("not installed")."""
    try:
        import ants  # noqa: PLC0415 (optional dependency)
    except ModuleNotFoundError as err:
        if err.name not in (None, "ants"):
            return None, f"not importable ({err})"
        return None, "not installed (pip install antspyx, or mdregnet[compare])"
    except ImportError as err:
        return None, f"not importable ({err})"
    return ants, None


def _require_ants():
    ants, reason = import_ants()
    if ants is None:
        raise ImportError(f"antspyx is {reason}")
    return ants


def syn_settings(metric="CC", sampling=None, iterations=SYN_ITERATIONS):
    """The keyword arguments of `ants.registration` used for SyN (see `SYN_TRANSFORM` above).

    Raises:
        ValueError: an unknown metric or empty iterations.
    """
    if metric not in SYN_METRICS:
        raise ValueError(f"unknown SyN metric {metric!r}; one of {SYN_METRICS}")
    iterations = tuple(int(n) for n in iterations)
    if not iterations:
        raise ValueError("SyN needs at least one resolution level of iterations")
    if sampling is None:
        sampling = SYN_DEFAULT_SAMPLING.get(metric, SYN_OTHER_SAMPLING)
    return dict(type_of_transform=SYN_TRANSFORM, syn_metric=metric, syn_sampling=int(sampling),
                reg_iterations=iterations, **SYN_FIXED_SETTINGS)


def set_itk_threads(threads):
    """Sets ITK's thread count for this process; returns the count in effect.

    ITK reads `ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS` once, when its thread pool starts (the first
    registration); later changes have no effect, so a different later request only warns.
    """
    global _itk_threads
    if _itk_threads is None:
        if threads is not None:
            os.environ[ITK_THREADS_ENV] = str(int(threads))
        _itk_threads = os.environ.get(ITK_THREADS_ENV) or f"ITK default ({os.cpu_count()})"
    elif threads is not None and str(int(threads)) != str(_itk_threads):
        warnings.warn(f"ITK already runs with {_itk_threads} threads in this process; "
                      f"{threads} is ignored", RuntimeWarning, stacklevel=2)
    return _itk_threads


def ants_image(array, spacing=(1.0, 1.0, 1.0)):
    """An ANTs image of a `(X, Y, Z)` array: origin 0, identity direction, `spacing` in mm.

    With these, ANTs' physical axis c is array axis c scaled by `spacing[c]`, so ANTs' fields
    convert to the package's voxel displacements by a division (`warp_field_to_disp`).
    """
    ants = _require_ants()
    array = np.asarray(array, np.float32)
    if array.ndim != 3:
        raise ValueError(f"need a (X, Y, Z) volume; got shape {array.shape}")
    return ants.from_numpy(array, origin=(0.0, 0.0, 0.0), spacing=tuple(float(s) for s in spacing),
                           direction=np.eye(3))


def syn_registration(fixed_img, moving_img, outprefix, metric="CC", sampling=None,
                     iterations=SYN_ITERATIONS):
    """`ants.registration(fixed_img, moving_img, **syn_settings(...))`, transforms at `outprefix`.

    Returns the antspyx result dict ('fwdtransforms': [warp field file, identity affine file],
    'warpedmovout', ...).
    """
    ants = _require_ants()
    return ants.registration(fixed_img, moving_img, outprefix=outprefix,
                             **syn_settings(metric, sampling, iterations))


def warp_field_to_disp(fwdtransforms, spacing=(1.0, 1.0, 1.0)):
    """The package displacement of a SyNOnly registration's forward transforms.

    ANTs' forward warp maps a fixed-image point x to the moving-image point x + w(x) (ITK
    displacement field, physical units), and `apply_transforms` samples the moving image there:
    the convention `warped(p) = moving(p + disp(p))`. With `ants_image`'s origin 0 and identity
    direction, component c of w lies along array axis c, so `disp = w / spacing`.

    Args:
        fwdtransforms: `[warp field .nii.gz, affine .mat]` (the affine must be the identity, as
            the initial transform of SyNOnly is) or `[warp field]`.
        spacing: the images' voxel size in mm, as given to `ants_image`.

    Returns:
        `(X, Y, Z, 3)` float32, voxels of the fixed grid.

    Raises:
        ValueError: the affine is not the identity, or the field is not a 3-component 3D field.
    """
    ants = _require_ants()
    warp, *rest = list(fwdtransforms)
    for path in rest:
        params = np.asarray(ants.read_transform(path).parameters, np.float64)
        identity = np.concatenate([np.eye(3).ravel(), np.zeros(3)])
        if params.shape != identity.shape or not np.allclose(params, identity, atol=1e-6):
            raise ValueError(f"{path}: expected the identity affine of SyNOnly, got parameters "
                             f"{params.tolist()}")
    field = ants.image_read(warp).numpy()
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"{warp}: expected a (X, Y, Z, 3) displacement field, got {field.shape}")
    return (field / np.asarray(spacing, np.float64)).astype(np.float32)


def register_syn(fixed, moving, spacing=(1.0, 1.0, 1.0), metric="CC", sampling=None,
                 iterations=SYN_ITERATIONS, threads=None):
    """Registers `moving` to `fixed` with ANTs SyN (`syn_settings`).

    Args:
        fixed, moving: `(X, Y, Z)` float arrays on one grid (intensities in [0, 1]).
        spacing: voxel size in mm (ANTs' gradient step is in mm; radii and sigmas in voxels).
        metric, sampling, iterations: see `syn_settings`.
        threads: ITK threads (`set_itk_threads`; only the first call of a process counts).

    Returns:
        `(disp, seconds)`: `disp` `(X, Y, Z, 3)` float32 in voxels of the fixed grid,
        `warped(p) = moving(p + disp(p))`; `seconds` the time of the `ants.registration` call.

    Raises:
        ImportError: antspyx is not installed.
        ValueError: bad shapes or settings.
        RuntimeError: ANTs failed.
    """
    if np.shape(fixed) != np.shape(moving):
        raise ValueError(f"fixed {np.shape(fixed)} and moving {np.shape(moving)} differ in shape")
    set_itk_threads(threads)
    fixed_img, moving_img = ants_image(fixed, spacing), ants_image(moving, spacing)
    with tempfile.TemporaryDirectory(prefix="mdregnet_syn_") as work:
        start = time.perf_counter()
        result = syn_registration(fixed_img, moving_img, os.path.join(work, "syn_"), metric,
                                  sampling, iterations)
        seconds = time.perf_counter() - start
        disp = warp_field_to_disp(result["fwdtransforms"], spacing)
    return disp, seconds


# ------------------------------------------------------------------------------------------------
# Protocol
# ------------------------------------------------------------------------------------------------
def moving_indices(ids, template, max_pairs=None):
    """Indices of the moving subjects: every id but `template`, the first `max_pairs` of them."""
    t = ids.index(template)
    moving = [i for i in range(len(ids)) if i != t]
    return moving if max_pairs is None else moving[:max(0, int(max_pairs))]


def register_pairs(method, register, images, labels, ids, template, moving_idx):
    """Rows of `method` for every moving subject, scored as `evaluate.evaluate` does.

    Args:
        method: the method's name (the rows' 'method').
        register: callable `(moving, fixed) -> (disp (X, Y, Z, 3) voxels, seconds)`.
        images, labels: `(N, X, Y, Z)` arrays; ids: the N ids; template: the fixed subject's id.
        moving_idx: indices of the moving subjects.

    Returns:
        list of dicts with `CSV_COLUMNS` and 'dice_per_label'.
    """
    t = ids.index(template)
    rows = []
    for i in moving_idx:
        disp, seconds = register(images[i], images[t])
        warped = infer.warp_labels(labels[i], disp)
        row, per_label = evaluate._direction_metrics("", labels[t], warped, labels[i], disp)
        row.update(method=method, moving_id=ids[i], fixed_id=template, time_s=float(seconds),
                   dice_per_label=per_label)
        rows.append(row)
    return rows


def parse_models(text):
    """`[(name, directory)]` from 'name=dir,name=dir' (ValueError on a bad or repeated entry)."""
    entries = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, directory = item.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ValueError(f"--models entry {item!r} is not name=dir")
        entries.append((name.strip(), directory.strip()))
    names = [n for n, _ in entries]
    if len(set(names)) != len(names) or {"affine", "syn", "models"} & set(names):
        raise ValueError(f"--models names must be unique and not affine/syn/models; got {names}")
    return entries


def _expand_methods(methods, model_entries):
    """`[(name, kind, directory)]` in order; kind 'affine', 'syn' or 'model'."""
    known = dict(model_entries)
    out = []
    for method in methods:
        if method in ("affine", "syn"):
            out.append((method, method, None))
        elif method == "models":
            out += [(name, "model", directory) for name, directory in model_entries]
        elif method in known:
            out.append((method, "model", known[method]))
        else:
            raise ValueError(f"unknown method {method!r}: affine, syn, models or a --models name "
                             f"({', '.join(known) or 'none given'})")
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {names}")
    return out


def run(images, labels, ids, spacing=(1.0, 1.0, 1.0), methods=("affine", "syn", "models"),
        models=(), template_seed=0, max_pairs=None, syn_metric="CC", syn_sampling=None,
        syn_iterations=SYN_ITERATIONS, syn_threads=2, refine_steps=(0,), log=print):
    """Registers the same pairs with every method and scores them.

    Args:
        images: `(N, X, Y, Z)` float32 in [0, 1] (`data.load_cohort`); labels: same shape, int.
        ids: the N subject ids.
        spacing: voxel size in mm (for ANTs).
        methods: names in order: 'affine', 'syn', 'models' (all of `models`) or a model name.
        models: `[(name, directory)]` of saved models (`models.save`); a directory that does not
            exist is skipped (status 'directory not found').
        template_seed: seed of `evaluate.choose_template`.
        max_pairs: only the first this many moving subjects.
        syn_metric, syn_sampling, syn_iterations: `syn_settings`; syn_threads: ITK threads.
        refine_steps: for each model, one method per value: 0 the network alone (named as the
            model), k > 0 the network plus k steps of test-time refinement (`mdregnet.refine`,
            named `<model>+refine<k>`; its time includes the refinement).
        log: callable for progress and skip messages.

    Returns:
        `(rows, summary)`: rows, one per (method, moving subject), with `CSV_COLUMNS` and
        'dice_per_label'; summary: 'settings' and 'methods', a list (table order) of dicts with
        'name', 'kind', 'status' ('ok' or why it was skipped), 'device', 'notes' and, when run,
        'summary' (`evaluate.summarise` of its rows: mean/std of every metric, per label Dice).

    Raises:
        ValueError: bad inputs (as `evaluate.evaluate`) or an unknown method.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    ids = [str(i) for i in ids]
    if images.ndim != 4 or labels.shape != images.shape or len(ids) != images.shape[0]:
        raise ValueError(f"need images and labels (N, X, Y, Z) of one shape and N ids; got images "
                         f"{images.shape}, labels {labels.shape}, {len(ids)} ids")
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise ValueError(f"need at least 2 unique subject ids; got {ids}")
    plan = []
    for name, kind, directory in _expand_methods(list(methods), list(models)):
        if kind in ("affine", "syn"):
            plan.append((name, kind, directory, 0))
        else:
            plan += [(name if k == 0 else f"{name}+refine{k}", kind, directory, int(k))
                     for k in refine_steps]
    template = evaluate.choose_template(ids, template_seed)
    moving_idx = moving_indices(ids, template, max_pairs)
    moving_ids = [ids[i] for i in moving_idx]
    log(f"template {template} (seed {template_seed}); {len(moving_idx)} moving subjects; "
        f"methods {', '.join(entry[0] for entry in plan)}")

    rows, entries = [], []
    for name, kind, directory, steps in plan:
        entry = {"name": name, "kind": kind, "status": "ok", "device": None, "notes": []}
        entries.append(entry)
        if kind == "affine":
            shape = images.shape[1:] + (3,)
            entry["device"] = "none (not computed)"
            entry["notes"].append("identity: the data are affinely pre-aligned by "
                                  "mdregnet.preprocess; runtime 0")
            method_rows = register_pairs(name, lambda m, f: (np.zeros(shape, np.float32), 0.0),
                                         images, labels, ids, template, moving_idx)
        elif kind == "syn":
            ants, reason = import_ants()
            if ants is None:
                entry["status"] = reason
                log(f"skipping syn: antspyx is {reason}")
                continue
            entry["settings"] = syn_settings(syn_metric, syn_sampling, syn_iterations)
            entry["antspyx_version"] = getattr(ants, "__version__", None)
            threads = set_itk_threads(syn_threads)
            entry["device"] = f"CPU, {threads} ITK threads"
            log(f"syn: {entry['settings']}, {threads} threads")

            def register(moving, fixed):
                disp, seconds = register_syn(fixed, moving, spacing, syn_metric, syn_sampling,
                                             syn_iterations, syn_threads)
                log(f"  syn pair done in {seconds:.1f} s")
                return disp, seconds

            method_rows = register_pairs(name, register, images, labels, ids, template,
                                         moving_idx)
        else:
            entry["directory"] = directory
            if not os.path.isdir(directory):
                entry["status"] = "directory not found"
                log(f"skipping {name}: no model directory {directory}")
                continue
            method_rows, model_summary = evaluate.evaluate(
                directory, images, labels, ids, template_id=template, inverse=False,
                max_subjects=max_pairs, refine_steps=steps)
            if steps:
                entry["refine_steps"] = steps
            if [r["moving_id"] for r in method_rows] != moving_ids:
                raise RuntimeError(f"{name}: evaluate.evaluate registered other pairs")
            entry["device"] = model_summary["device"]
            entry["notes"] += model_summary["notes"]
            entry["model"] = model_summary["model"]
            for row in method_rows:
                row["method"] = name
        entry["summary"] = evaluate.summarise(method_rows, {"opposite_direction": False})
        stat = entry["summary"]["forward"]["dice_mean"]
        log(f"{name}: Dice {stat['mean']:.4f} over {stat['n']} pairs")
        rows += method_rows

    settings = {
        "template_id": template,
        "template_seed": int(template_seed),
        "n_subjects": len(ids),
        "n_pairs": len(moving_idx),
        "moving_ids": moving_ids,
        "shape": [int(n) for n in images.shape[1:]],
        "spacing_mm": [float(s) for s in spacing],
        "methods": [entry[0] for entry in plan],
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    return rows, {"settings": settings, "methods": entries}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def table(summary):
    """The Markdown comparison table (one line per method, skipped ones with their reason)."""
    lines = ["| method | pairs | Dice mean ± std | folding % (grid) mean | folding voxels mean "
             "| SDlogJ mean ± std | time per pair (s) | device |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in summary["methods"]:
        if entry["status"] != "ok":
            lines.append(f"| {entry['name']} | 0 | {entry['status']} | — | — | — | — | — |")
            continue
        part = entry["summary"]["forward"]

        def mean(key, digits, part=part):
            return "n/a" if part[key]["n"] == 0 else f"{part[key]['mean']:.{digits}f}"

        lines.append(f"| {entry['name']} | {part['dice_mean']['n']} | "
                     f"{evaluate._fmt(part['dice_mean'], 3)} | {mean('folding_percent', 4)} | "
                     f"{mean('folding_count', 1)} | {evaluate._fmt(part['sdlogj'], 4)} | "
                     f"{evaluate._fmt(entry['summary']['time_s'], 3)} | {entry['device']} |")
    return "\n".join(lines) + "\n"


def markdown(summary):
    """compare.md: title, protocol, the table, notes, the command line and the settings."""
    s = summary["settings"]
    lines = [
        "# Registration methods compared on the same pairs",
        "",
        f"{s['n_pairs']} moving subjects registered to the template `{s['template_id']}` "
        f"(seed {s['template_seed']}) of {s['n_subjects']} subjects, grid {tuple(s['shape'])} "
        f"at {tuple(s['spacing_mm'])} mm. Dice: mean over the template's labels (background "
        "excluded) of the moving labels warped by nearest neighbour; folding: voxels with "
        "det(I + grad u) <= 0 over the grid; SDlogJ over the grid; mean ± std over pairs.",
        "",
        table(summary).rstrip("\n"),
        "",
    ]
    for entry in summary["methods"]:
        notes = list(entry["notes"])
        if entry["kind"] == "syn" and entry["status"] == "ok":
            notes.append("time = the ants.registration call (CPU), including ANTs writing its "
                         f"transform files; settings {entry['settings']}, antspyx "
                         f"{entry.get('antspyx_version')}")
        if entry["kind"] == "model" and entry["status"] == "ok":
            notes.append(f"model `{entry['model']['name']}` from `{entry['directory']}`; time = "
                         "the model call after one warm-up call")
        if entry["kind"] == "model" and entry["status"] != "ok":
            notes.append(f"skipped: {entry['status']} ({entry['directory']})")
        lines += [f"- {entry['name']}: {note}" for note in notes]
    lines += ["", "Command:", "", "    " + summary.get("command", "(not run from the command "
                                                               "line)"), "",
              "Settings:", "", "```json",
              json.dumps(infer.jsonable(s), indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, rows, summary):
    """Writes compare.csv, compare.md and compare.json into `out_dir` (created), atomically.

    Returns:
        dict file name -> path.
    """
    os.makedirs(out_dir, exist_ok=True)
    csv_text = evaluate._csv_text(CSV_COLUMNS, [[row.get(c) for c in CSV_COLUMNS]
                                                for row in rows])
    saved = dict(summary, rows=[{c: row.get(c) for c in CSV_COLUMNS} for row in rows])
    json_text = json.dumps(infer.jsonable(saved), indent=2, sort_keys=True,
                           allow_nan=False) + "\n"
    texts = {"compare.csv": csv_text, "compare.md": markdown(summary), "compare.json": json_text}
    return {name: _write_text(os.path.join(out_dir, name), text) for name, text in texts.items()}


def _write_text(path, text):
    """Writes `text` (UTF-8) to `path` with `io.atomic_write`; returns `path`."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    io.atomic_write(path, write)
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _path(fv, name, value):
    """A flag's path; relative defaults are relative to the repository root, given ones to cwd."""
    return value if fv[name].present or os.path.isabs(value) else os.path.join(REPO, value)


def run_from_flags(fv=FLAGS, argv=None):
    """The command line's work, reading parsed flags `fv`; returns `(rows, summary, paths)`."""
    infer.set_device(fv.device)
    data_dir = _path(fv, "data_dir", fv.data_dir)
    subjects = None if fv.subjects in (None, "", "all") else _path(fv, "subjects", fv.subjects)
    models = [(name, _path(fv, "models", directory))
              for name, directory in parse_models(fv.models)]
    found = data.find_subjects(os.path.join(data_dir, "images"), os.path.join(data_dir, "labels"),
                               subjects=subjects)
    started = time.perf_counter()
    images, labels, reference = data.load_cohort(found, with_labels=True)
    spacing = tuple(float(z) for z in reference.header.get_zooms()[:3])
    print(f"loaded {len(found)} subjects of shape {images.shape[1:]} ({spacing} mm) from "
          f"{data_dir} in {time.perf_counter() - started:.1f} s")
    rows, summary = run(images, labels, [s.id for s in found], spacing=spacing,
                        methods=fv.methods, models=models, template_seed=fv.template_seed,
                        max_pairs=fv.max_pairs, syn_metric=fv.syn_metric,
                        syn_sampling=fv.syn_sampling,
                        syn_iterations=[int(n) for n in fv.syn_iterations],
                        syn_threads=fv.syn_threads,
                        refine_steps=[int(k) for k in fv.refine_steps])
    summary["settings"].update(data_dir=os.path.abspath(data_dir), subjects_file=subjects,
                               models=dict(models))
    summary["command"] = "python " + shlex.join(argv if argv is not None else sys.argv)
    paths = write_outputs(fv.out, rows, summary)
    print(table(summary))
    print(f"outputs in {os.path.abspath(fv.out)}: {', '.join(paths)}")
    return rows, summary, paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run_from_flags(FLAGS, sys.argv)
    except (OSError, ValueError) as err:  # io.InvalidInputError is a ValueError
        sys.exit(f"compare: error: {err}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
