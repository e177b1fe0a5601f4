"""Training curves of saved models from the history in their config.json (issue #15).

    python experiments/training_curve.py                       # the two shipped IXI 2 mm models
    python experiments/training_curve.py --models runs/a/model,runs/b/model --out curve.png

Draws, against the cumulative training step, the validation Dice (mean over the validation pairs
of the mean Dice over the fixed map's labels; the Dice before registration as a dashed line), the
validation folding (% of voxels with det(J) <= 0) and the training loss of every model, one line
per model, with the boundaries of the training runs marked. Reads only `extra['history']`
(`mdregnet.train.empty_history`), or the final numbers of a model saved before histories were
recorded. Writes a PNG and prints a table of the validations.
"""

import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHIPPED = ",".join(os.path.join(REPO, "mdregnet", "pretrained", name)
                   for name in ("mdregnet_ixi2mm", "voxelmorph_ixi2mm"))


def load_history(model_dir):
    """`(label, history)` of a saved model: its name and the training history of its config
    (`mdregnet.train.empty_history` layout; a model saved before histories were recorded gives
    the one-run history of its final numbers)."""
    from mdregnet import models, train

    config = models.read_config(model_dir)
    history, steps = train.model_history(config.get("extra") or {})
    return f"{config['name']} ({steps} steps)", history


def plot(histories, out_path):
    """Writes the figure of `histories` (list of `(label, history)`) to `out_path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (label, history) in enumerate(histories):
        color = f"C{i}"
        val = sorted(history["validation"], key=lambda v: v["step"])
        steps = [v["step"] for v in val]
        if val and "dice_mean" in val[0]:
            axes[0].plot(steps, [v["dice_mean"] for v in val], "o-", color=color, label=label,
                         markersize=3)
            if i == 0:
                axes[0].plot(steps, [v["dice_before"] for v in val], "--", color="gray",
                             label="before registration")
        axes[1].plot(steps, [v["folding_percent"] for v in val], "o-", color=color, label=label,
                     markersize=3)
        rows = history["train"]
        if rows:
            col = {name: k for k, name in enumerate(history["train_columns"])}
            axes[2].plot([r[col["step"]] for r in rows], [r[col["loss"]] for r in rows],
                         color=color, label=label, linewidth=0.8)
        for run in history["runs"][1:]:
            for ax in axes:
                ax.axvline(run["start_step"], color=color, alpha=0.15, linewidth=0.8)
    axes[0].set(title="validation Dice", xlabel="training step", ylabel="mean Dice")
    axes[1].set(title="validation folding (det J <= 0)", xlabel="training step",
                ylabel="% of voxels")
    axes[2].set(title="training loss", xlabel="training step", ylabel="objective")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("IXI, 2 mm, 140 training subjects; validation pairs of the 20 held-out subjects "
                 "(faint lines: start of each training run)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def table(histories):
    """Markdown table of every validation of every model."""
    lines = ["| model | step | Dice | Dice before | folding % | folding voxels |",
             "|---|---|---|---|---|---|"]
    for label, history in histories:
        for v in sorted(history["validation"], key=lambda v: v["step"]):
            lines.append(f"| {label} | {v['step']} | {v.get('dice_mean', float('nan')):.4f} | "
                         f"{v.get('dice_before', float('nan')):.4f} | "
                         f"{v['folding_percent']:.4f} | {v['folding_count']:.1f} |")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    histories = [load_history(path) for path in FLAGS.models]
    plot(histories, FLAGS.out)
    print(table(histories))
    print(f"figure: {FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_list("models", SHIPPED, "Saved model directories (config.json with a history).")
    flags.DEFINE_string("out", os.path.join(REPO, "experiments", "results", "training_curve.png"),
                        "Output PNG.")
    app.run(main)
