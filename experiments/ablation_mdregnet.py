"""MDReg-Net ablations of the paper: the lambda sweep (Fig. 2), the smoothing layer and the two
directions (Table 3), on IXI at a CPU-sized resolution.

    python experiments/ablation_mdregnet.py [--data_dir work_data/ixi_2mm] \
        [--train_subjects experiments/splits/ixi_train.txt] \
        [--val_subjects experiments/splits/ixi_val.txt] [--downsample 2] [--size 48,64,48] \
        [--steps 100] [--lr 1e-3] [--val_pairs 10] [--lams 0.1,0.2,0.35,0.5,0.75,1] \
        [--no_smoothing_lams 0.5,1] [--table3_lam 0.35] [--out experiments/results]

What the paper did (Zhuo & Fan, `../shared/papers/mdregnet.md`, Network Training and Results):
- Fig. 2: MDReg-Net (with the spatial smoothing layer) trained for each
  lambda in {0.1, 0.2, 0.35, 0.5, 0.75, 1}; mean Dice over 30 FreeSurfer structures and the number
  of voxels with a non-positive Jacobian determinant in the brain on the validation set. Dice
  peaks near lambda = 0.35, and lambda >= 0.35 gave no folding voxels.
- Table 3: MDReg-Net with the smoothing layer (lambda = 0.35) against MDReg-Net without it
  (lambda = 0.5, best Dice, and lambda = 1.0, no folding on validation), each evaluated in both
  directions. "Direction" is the EVALUATION direction of one trained model: "registering images
  with the deformation fields computed in the opposite direction, that is, registering fixed
  images to moving images, based on the same velocity fields" (Evaluation Metrics). So no model
  is trained twice: the forward row warps each subject's labels onto the template with
  `disp = exp(v)`, the inverse row warps the template's labels onto each subject with
  `inverse_disp = exp(-v)` (the training is bidirectional in both rows, as the paper's eq. 3).

Here: every variant is trained from the same seed with the package's train step
(`mdregnet.train.make_train_step`) on all ordered pairs of the IXI training subjects
(`mdregnet.data.pair_dataset`, batch 1, Adam), and evaluated by `mdregnet.evaluate.evaluate`
(the code path of `python -m mdregnet.evaluate`): one seeded template of the validation subjects
is the fixed image, the first `--val_pairs` other validation subjects are moving; Dice is the mean
over the template's labels (background excluded) of the moving labels warped by nearest
neighbour; folding voxels are those with det(I + grad u) <= 0 inside the target's brain mask
(labels > 0), the paper's count, and over the grid.

CPU setting (defaults): the prepared 2 mm volumes (80x112x80) are down-sampled by 2 (4 mm:
images by 2x2x2 block means, label maps by the block's most frequent label) to 40x56x40 and
zero-padded to 48x64x48 (divisible by MDReg-Net's factor 16), and each variant trains `--steps`
steps with Adam lr 1e-3 (the paper's 1e-4 moves the network too little in a few hundred steps).
The paper's protocol is `--downsample 1 --size 80,112,80 --steps 150000 --lr 1e-4 --val_pairs 20`
(at 2 mm rather than the paper's 1 mm; on a GPU).

Writes `ablation_mdregnet.md` and `.json` into `--out`, and each trained model
(`mdregnet.models.save`) with its scores into `--workdir/<variant>/`; a rerun with the same
settings reuses the variants already finished there (`--noreuse` retrains).
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation_common as common  # noqa: E402
from mdregnet import data, evaluate, infer, models, train  # noqa: E402

FLAGS = flags.FLAGS

PAPER_LAMS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
PAPER_NO_SMOOTHING_LAMS = (0.5, 1.0)
PAPER_STEPS = 150000
#: Per-direction metrics kept in the JSON (from `evaluate.summarise`).
KEPT = ("dice_mean", "dice_before", "folding_count", "folding_percent", "folding_count_in_mask",
        "folding_percent_in_mask", "sdlogj_in_mask")


class DataMissingError(FileNotFoundError):
    """The prepared IXI folder is absent (run `make prepare-ixi`)."""


def define_flags(flag_values=FLAGS):
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", "work_data/ixi_2mm", "Prepared IXI (`make prepare-ixi`): "
                        "images/ and labels/ (relative paths: to the repository root).", **fv)
    flags.DEFINE_string("train_subjects", "experiments/splits/ixi_train.txt", "Training ids.",
                        **fv)
    flags.DEFINE_string("val_subjects", "experiments/splits/ixi_val.txt", "Validation ids.", **fv)
    flags.DEFINE_integer("max_train_subjects", None, "Use only the first N training subjects.",
                         **fv)
    flags.DEFINE_integer("downsample", 2, "Integer down-sampling factor of the prepared volumes "
                         "(2: 2 mm -> 4 mm; 1: as prepared).", lower_bound=1, **fv)
    flags.DEFINE_list("size", ["48", "64", "48"], "Grid the down-sampled volumes are centre-"
                      "cropped/zero-padded to (each divisible by 16).", **fv)
    flags.DEFINE_integer("steps", 100, f"Training steps per variant (paper: {PAPER_STEPS}).",
                         lower_bound=0, **fv)
    flags.DEFINE_float("lr", 1e-3, "Adam learning rate (paper: 1e-4; 10x larger by default for "
                       "the short CPU budget).", **fv)
    flags.DEFINE_integer("batch_size", 1, "Pairs per step (paper: 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the pair order (same for every "
                         "variant).", **fv)
    flags.DEFINE_integer("val_pairs", 10, "Moving validation subjects registered to the "
                         "template (paper: all 100 PING validation subjects).", lower_bound=1,
                         **fv)
    flags.DEFINE_integer("template_seed", 0, "Seed of the template (evaluate.choose_template).",
                         **fv)
    flags.DEFINE_list("lams", [str(v) for v in PAPER_LAMS], "Lambda sweep with the smoothing "
                      "layer (paper Fig. 2).", **fv)
    flags.DEFINE_list("no_smoothing_lams", [str(v) for v in PAPER_NO_SMOOTHING_LAMS],
                      "Lambdas of the models without the smoothing layer (paper Table 3).", **fv)
    flags.DEFINE_float("table3_lam", 0.35, "Lambda of the model with the smoothing layer in "
                       "Table 3 (the paper's choice).", **fv)
    flags.DEFINE_string("out", "experiments/results", "Folder of ablation_mdregnet.md/.json.",
                        **fv)
    flags.DEFINE_string("workdir", "runs/ablations/mdregnet", "Trained variants and their scores.",
                        **fv)
    flags.DEFINE_boolean("reuse", True, "Reuse variants finished in --workdir with the same "
                         "settings.", **fv)
    flags.DEFINE_integer("log_every", 25, "Steps between progress lines.", **fv)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def downsample_images(images, factor):
    """Block means over `factor^3` voxels: `(N, X, Y, Z)` -> `(N, X/f, Y/f, Z/f)` float32.

    Sizes not divisible by `factor` lose their last voxels. Coarse voxel i covers fine voxels
    f*i .. f*i + f - 1 (the same blocks as `downsample_labels`).
    """
    f = int(factor)
    if f == 1:
        return np.asarray(images, np.float32)
    n = images.shape[0]
    sizes = [s // f for s in images.shape[1:]]
    cut = images[:, :sizes[0] * f, :sizes[1] * f, :sizes[2] * f]
    blocks = cut.reshape(n, sizes[0], f, sizes[1], f, sizes[2], f)
    return blocks.mean(axis=(2, 4, 6), dtype=np.float64).astype(np.float32)


def downsample_labels(labels, factor):
    """The most frequent label of each `factor^3` block (ties: the smaller label), int32."""
    f = int(factor)
    if f == 1:
        return np.asarray(labels, np.int32)
    n = labels.shape[0]
    sizes = [s // f for s in labels.shape[1:]]
    cut = labels[:, :sizes[0] * f, :sizes[1] * f, :sizes[2] * f]
    blocks = cut.reshape(n, sizes[0], f, sizes[1], f, sizes[2], f).transpose(0, 1, 3, 5, 2, 4, 6)
    flat = np.sort(blocks.reshape(-1, f ** 3), axis=1)
    # count of each entry's value within its (sorted) row, then the first entry of maximal count
    counts = (flat[:, :, None] == flat[:, None, :]).sum(axis=2)
    winner = flat[np.arange(flat.shape[0]), np.argmax(counts, axis=1)]
    return winner.reshape(n, *sizes).astype(np.int32)


def load_ixi(data_dir, subjects, with_labels, factor, size, max_subjects=None, chunk=20):
    """Loads a split of the prepared IXI, down-sampled by `factor` and fitted to `size`.

    Returns:
        `(ids, images (N, *size) float32, labels (N, *size) int32 or None, note)`.

    Raises:
        DataMissingError: `data_dir/images` does not exist (with the command that makes it).
    """
    if not os.path.isdir(os.path.join(data_dir, "images")):
        raise DataMissingError(
            f"{data_dir}: no prepared IXI data (images/ and labels/); run `make prepare-ixi` "
            "first (it writes work_data/ixi_2mm), or pass --data_dir")
    found = data.find_subjects(os.path.join(data_dir, "images"),
                               os.path.join(data_dir, "labels") if with_labels else None,
                               subjects=subjects)
    if max_subjects:
        found = found[:max_subjects]
    images, labels, note = [], [], ""
    for start in range(0, len(found), chunk):  # down-sample chunk by chunk to bound memory
        img, lab, _ = data.load_cohort(found[start:start + chunk], with_labels=with_labels)
        img, note = train.fit_to_shape(downsample_images(img, factor), size)
        images.append(img)
        if with_labels:
            labels.append(train.fit_to_shape(downsample_labels(lab, factor), size)[0])
    return ([s.id for s in found], np.concatenate(images),
            np.concatenate(labels) if with_labels else None, note)


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------
def variants(lams, no_smoothing_lams, table3_lam, extra_hparams=None):
    """The models to train: `[{'name', 'hparams', 'smoothing'}]`, the sweep first.

    `extra_hparams` (e.g. smaller `enc_features` in tests) apply to every variant."""
    extra = dict(extra_hparams or {})
    out = []
    for lam in list(lams) + ([table3_lam] if table3_lam not in lams else []):
        out.append({"name": f"smoothing_lam{lam:g}", "smoothing": True,
                    "hparams": dict(extra, lam=float(lam), smoothing="deformation")})
    for lam in no_smoothing_lams:
        out.append({"name": f"no_smoothing_lam{lam:g}", "smoothing": False,
                    "hparams": dict(extra, lam=float(lam), smoothing="none")})
    return out


def _direction(summary, key):
    part = summary.get(key)
    if not part:
        return None
    kept = {k: part[k] for k in KEPT}
    kept["pairs_with_folding"] = part["pairs_with_folding"]
    return kept


def run_variant(variant, shape, train_images, val, steps, lr, batch_size, seed, val_pairs,
                template_seed, workdir=None, reuse=True, settings=None, log=print, log_every=25):
    """Trains (or reuses) one variant and evaluates it; returns its result dict."""
    directory = os.path.join(workdir, variant["name"]) if workdir else None
    key = {"variant": variant, "settings": settings or {}}
    result_path = os.path.join(directory, "result.json") if directory else None
    if reuse and result_path and os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == infer.jsonable(key):
            log(f"{variant['name']}: reusing {result_path}")
            return saved["result"]
    pairs = data.pair_dataset(train_images, batch_size=batch_size, seed=seed).as_numpy_iterator()
    try:
        model, info = common.train_variant("mdregnet", shape, variant["hparams"], pairs, steps,
                                           lr=lr, seed=seed, log=log, log_every=log_every,
                                           label=variant["name"])
    except FloatingPointError as err:  # one diverged variant must not lose the others
        log(f"{variant['name']}: {err}; reported as diverged")
        return {"name": variant["name"], "smoothing": variant["smoothing"],
                "lam": variant["hparams"]["lam"], "diverged": str(err), "n_pairs": 0,
                "train": {"seconds": float("nan"), "seconds_per_step": None,
                          "final_loss": None}, "forward": None, "inverse": None}
    started = time.perf_counter()
    _, summary = evaluate.evaluate(model, val["images"], val["labels"], val["ids"],
                                   template_seed=template_seed, inverse=True,
                                   max_subjects=val_pairs)
    result = {"name": variant["name"], "smoothing": variant["smoothing"],
              "lam": variant["hparams"]["lam"], "hparams": model.mdregnet_config["hparams"],
              "train": info, "eval_seconds": time.perf_counter() - started,
              "template_id": summary["template_id"], "n_pairs": summary["n_pairs"],
              "forward": _direction(summary, "forward"),
              "inverse": _direction(summary, "inverse")}
    fwd = result["forward"]
    log(f"{variant['name']}: Dice {fwd['dice_mean']['mean']:.4f} (before "
        f"{fwd['dice_before']['mean']:.4f}), folding voxels in brain "
        f"{fwd['folding_count_in_mask']['mean']:.1f}, trained in {info['seconds']:.0f} s")
    if directory:
        models.save(model, os.path.join(directory, "model"))
        common.write_json(result_path, {"key": key, "result": result})
    return result


def run(train_images, val, shape, steps=100, lr=1e-3, batch_size=1, seed=0, val_pairs=10,
        template_seed=0, lams=PAPER_LAMS, no_smoothing_lams=PAPER_NO_SMOOTHING_LAMS,
        table3_lam=0.35, workdir=None, reuse=True, settings=None, log=print, log_every=25,
        extra_hparams=None):
    """Trains and evaluates every variant; returns the list of results (`run_variant`)."""
    results = []
    for variant in variants(lams, no_smoothing_lams, table3_lam, extra_hparams):
        results.append(run_variant(variant, shape, train_images, val, steps, lr, batch_size,
                                   seed, val_pairs, template_seed, workdir, reuse, settings,
                                   log, log_every))
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _find(results, smoothing, lam):
    for r in results:
        if r["smoothing"] == smoothing and abs(r["lam"] - lam) < 1e-9:
            return r
    return None


def sweep_table(results):
    """Fig. 2: lambda vs Dice and folding voxels (with the smoothing layer, forward)."""
    rows = []
    for r in sorted((r for r in results if r["smoothing"]), key=lambda r: r["lam"]):
        f = r["forward"]
        if f is None:
            rows.append([f"{r['lam']:g}", "diverged (NaN loss)", "—", "—", "—", "—"])
            continue
        rows.append([f"{r['lam']:g}", common.fmt_stat(f["dice_mean"]),
                     common.fmt(f["folding_count_in_mask"]["mean"], 1),
                     common.fmt(f["folding_percent_in_mask"]["mean"], 4),
                     f"{f['pairs_with_folding']} of {r['n_pairs']}",
                     common.fmt(r["train"]["final_loss"], 4)])
    return common.markdown_table(
        ["λ", "Dice (mean ± std over pairs)", "folding voxels in brain (mean)",
         "folding % in brain", "pairs with folding", "final training loss"], rows)


def table3(results, table3_lam, no_smoothing_lams):
    """Table 3: with/without the smoothing layer, forward and inverse directions."""
    rows = []
    plan = [(True, table3_lam)] + [(False, lam) for lam in no_smoothing_lams]
    for smoothing, lam in plan:
        r = _find(results, smoothing, lam)
        if r is None:
            continue
        for direction, title in (("forward", "forward (subject → template, exp(v))"),
                                 ("inverse", "inverse (template → subject, exp(−v))")):
            d = r[direction]
            if d is None:
                continue
            rows.append([("with" if smoothing else "without") + " smoothing", f"{lam:g}", title,
                         common.fmt_stat(d["dice_mean"]),
                         common.fmt(d["folding_count_in_mask"]["mean"], 1),
                         common.fmt(d["folding_count"]["mean"], 1),
                         f"{d['pairs_with_folding']} of {r['n_pairs']}"])
    return common.markdown_table(
        ["model", "λ", "direction", "Dice (mean ± std)", "folding voxels in brain (mean)",
         "folding voxels in grid (mean)", "pairs with folding"], rows)


def markdown(results, settings):
    s = settings
    scored = [r for r in results if r["forward"]]
    before = scored[0]["forward"]["dice_before"] if scored else None
    lines = [
        "# MDReg-Net ablations: λ sweep (Fig. 2), smoothing layer and direction (Table 3)",
        "",
        f"IXI, {s['n_train']} training subjects (all ordered pairs), {s['n_pairs']} validation "
        f"subjects registered to the template `{s['template_id']}` (seed {s['template_seed']}, "
        f"of {s['n_val']} validation subjects), grid {tuple(s['size'])} after down-sampling the "
        f"prepared {s['voxel_mm_prepared']:g} mm volumes by {s['downsample']} "
        f"({s['voxel_mm']:g} mm; {s['fit_note'] or 'no crop or pad'}). Each variant: "
        f"{s['steps']} steps, batch {s['batch_size']}, Adam lr {s['lr']:g}, seed {s['seed']}, "
        "the paper's architecture and bidirectional multi-level loss. Evaluation: "
        "`mdregnet.evaluate.evaluate` (Dice over the template's labels, background excluded; "
        "folding = voxels with det(I + grad u) <= 0 inside the target's brain mask, the paper's "
        f"count). Dice before registration: {common.fmt_stat(before)}.",
        "",
        common.cpu_budget_sentence(s["steps"], f"{PAPER_STEPS:,} (1 mm, PING, on a GPU)"),
        "",
        "## λ sweep with the smoothing layer (paper Fig. 2), forward direction",
        "",
        "Paper: Dice highest near λ = 0.35; no folding voxels for λ >= 0.35.",
        "",
        sweep_table(results),
        "",
        "## With and without the smoothing layer, both directions (paper Table 3)",
        "",
        "Direction is the evaluation direction of the same trained model (paper, Evaluation "
        "Metrics: \"registering fixed images to moving images, based on the same velocity "
        "fields\"): forward warps each subject's labels onto the template with exp(v), inverse "
        "warps the template's labels onto each subject with exp(−v); folding is counted in the "
        "target's brain mask of that direction. Paper: without the layer λ = 0.5 gave the best "
        "Dice and λ = 1.0 no folding on validation; the layer gave near-diffeomorphic "
        "registration at little Dice cost; no significant difference between the directions.",
        "",
        table3(results, s["table3_lam"], s["no_smoothing_lams"]),
        "",
        "## Run",
        "",
        f"- machine: {s['machine']}",
        "- training time per variant: "
        + ", ".join(f"{r['name']} {common.fmt(r['train']['seconds'], 0)} s" for r in results),
        "- seconds per step (after the first): "
        + ", ".join(f"{r['name']} {common.fmt(r['train']['seconds_per_step'], 2)}"
                    for r in results),
        f"- total wall time: {s['wall_seconds'] / 60:.1f} min, finished {s['finished']}",
        f"- command: `{s['command']}`",
        "- paper's protocol: `--downsample 1 --size 80,112,80 --steps 150000 --lr 1e-4 "
        "--val_pairs 20` "
        "(2 mm instead of the paper's 1 mm PING data; GPU)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run_from_flags(fv=FLAGS, argv=None, log=print):
    """The script's work from parsed flags; returns `(results, settings, paths)`."""
    started = time.perf_counter()
    size = common.parse_ints(fv.size, "size")
    if len(size) != 3:
        raise ValueError(f"--size needs 3 sizes, got {fv.size}")
    train.check_shape(size, "mdregnet", models.get_method("mdregnet").divisor, "--size")
    lams = common.parse_floats(fv.lams, "lams")
    no_smoothing_lams = common.parse_floats(fv.no_smoothing_lams, "no_smoothing_lams")
    data_dir = common.resolve(fv.data_dir)
    machine = common.machine()
    log(f"loading {data_dir} (down-sampled by {fv.downsample}, fitted to {size})")
    train_ids, train_images, _, note = load_ixi(data_dir, common.resolve(fv.train_subjects), False,
                                                fv.downsample, size, fv.max_train_subjects)
    val_ids, val_images, val_labels, _ = load_ixi(data_dir, common.resolve(fv.val_subjects), True,
                                                  fv.downsample, size)
    val = {"ids": val_ids, "images": val_images, "labels": val_labels}
    template = evaluate.choose_template(val_ids, fv.template_seed)
    log(f"{len(train_ids)} training, {len(val_ids)} validation subjects ({note or 'no crop/pad'}"
        f"), loaded in {time.perf_counter() - started:.0f} s")
    key_settings = {"data_dir": os.path.abspath(data_dir), "train_ids": train_ids,
                    "val_ids": val_ids, "downsample": fv.downsample, "size": list(size),
                    "steps": fv.steps, "lr": fv.lr, "batch_size": fv.batch_size, "seed": fv.seed,
                    "val_pairs": fv.val_pairs, "template_seed": fv.template_seed}
    results = run(train_images, val, size, fv.steps, fv.lr, fv.batch_size, fv.seed, fv.val_pairs,
                  fv.template_seed, lams, no_smoothing_lams, fv.table3_lam,
                  workdir=common.resolve(fv.workdir), reuse=fv.reuse, settings=key_settings, log=log,
                  log_every=fv.log_every)
    zoom = _voxel_mm(data_dir)
    settings = dict(key_settings, n_train=len(train_ids), n_val=len(val_ids),
                    n_pairs=max([r["n_pairs"] for r in results] + [0]), template_id=template,
                    voxel_mm_prepared=zoom, voxel_mm=zoom * fv.downsample, fit_note=note,
                    lams=lams, no_smoothing_lams=no_smoothing_lams, table3_lam=fv.table3_lam,
                    paper_steps=PAPER_STEPS, machine=machine,
                    wall_seconds=time.perf_counter() - started, finished=common.timestamp(),
                    command=common.command_line(argv))
    settings.pop("train_ids")
    text = markdown(results, settings)
    paths = common.write_report(common.resolve(fv.out), "mdregnet", text,
                                {"settings": settings, "train_ids": train_ids,
                                 "results": results})
    print(text)
    log(f"wrote {paths[0]} and {paths[1]}")
    return results, settings, paths


def _voxel_mm(data_dir):
    import nibabel as nib

    first = sorted(os.listdir(os.path.join(data_dir, "images")))[0]
    return float(nib.load(os.path.join(data_dir, "images", first)).header.get_zooms()[0])


main = common.absl_main("ablation_mdregnet", run_from_flags, FLAGS)

if __name__ == "__main__":
    define_flags()
    app.run(main)
