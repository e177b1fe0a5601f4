#!/usr/bin/env bash
# The CPU training campaign of the shipped models (issue #15), one session's run at a time.
#
#   experiments/campaign.sh start MODEL [HPARAMS_JSON]   # background run from the shipped weights
#   experiments/campaign.sh status                       # last progress line of each run
#   experiments/campaign.sh stop MODEL                   # SIGTERM (checkpoint), save the model,
#                                                        # copy it over the shipped one
#
# MODEL is mdregnet or voxelmorph; the shipped model is mdregnet/pretrained/MODEL_ixi2mm and every
# run continues it with `python -m mdregnet.train --init_from` (weights, cumulative step count,
# pair stream and training history carried on), on the 140 IXI training subjects at 2 mm
# (`make prepare-ixi`), with the paper's settings: batch 1, Adam lr 1e-4, MDReg-Net lambda 0.35,
# VoxelMorph its own defaults. HPARAMS_JSON overrides computation-only hyper-parameters (the
# schedule allowed by #15: '{"int_downsize": 2}' for most MDReg-Net steps, then at least 5,000
# steps with the paper's full-resolution integration, '{}').
#
# `start` on a model whose run folder exists resumes that run (same command, its checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${IXI_PREP:-work_data/ixi_2mm}
ROOT=runs/campaign
STEPS=${STEPS:-200000}  # an upper bound: a run is stopped by `stop`, not by its step count

usage() { sed -n '2,8p' "$0" >&2; exit 2; }

train_cmd() {  # MODEL HPARAMS WORKDIR STEPS
    local model=$1 hparams=$2 workdir=$3 steps=$4
    echo "$PY" -m mdregnet.train --model "$model" --lr 1e-4 --batch_size 1 --steps "$steps" \
        --hparams "'$hparams'" --init_from "mdregnet/pretrained/${model}_ixi2mm" \
        --data_dir "$DATA" --train_subjects experiments/splits/ixi_train.txt \
        --val_subjects experiments/splits/ixi_val.txt --val_pairs 5 --val_every 1000 \
        --checkpoint_every 250 --log_every 50 --mixed_precision off --workdir "$workdir"
}

case "${1:-}" in
start)
    model=${2:?model}; hparams=${3:-"{}"}
    [ -d "$DATA/images" ] || { echo "$DATA: run 'make prepare-ixi' first" >&2; exit 1; }
    mkdir -p "$ROOT"
    workdir="$ROOT/$model"
    if [ -e "$workdir" ]; then  # resume the run there (its checkpoints), same command
        cmd=$(cat "$ROOT/$model.cmd")
    else
        cmd=$(train_cmd "$model" "$hparams" "$workdir" "$STEPS")
        echo "$cmd" > "$ROOT/$model.cmd"
    fi
    TF_CPP_MIN_LOG_LEVEL=2 nohup bash -c "exec $cmd" >> "$ROOT/$model.log" 2>&1 &
    echo $! > "$ROOT/$model.pid"
    echo "started $model (pid $!): log $ROOT/$model.log"
    ;;
status)
    for log in "$ROOT"/*.log; do
        [ -e "$log" ] || continue
        echo "$log: $(grep -E '^(step|validation)' "$log" | tail -n 2 | tr '\n' ' ')"
    done
    ;;
stop)
    model=${2:?model}
    workdir="$ROOT/$model"
    pid=$(cat "$ROOT/$model.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 2; done
    fi
    step=$(grep -o 'stopped by SIGTERM at step [0-9]*' "$ROOT/$model.log" | tail -n 1 | awk '{print $NF}')
    [ -n "$step" ] || { echo "$ROOT/$model.log: no checkpointed stop found" >&2; exit 1; }
    # Resuming at the saved step with --steps equal to it trains nothing: it validates and saves.
    cmd=$(sed -E "s/--steps [0-9]+/--steps $step/" "$ROOT/$model.cmd")
    TF_CPP_MIN_LOG_LEVEL=2 bash -c "$cmd" >> "$ROOT/$model.log" 2>&1
    dest="mdregnet/pretrained/${model}_ixi2mm"
    cp "$workdir/model/config.json" "$workdir/model/model.weights.h5" "$dest/"
    mkdir -p "$ROOT/done"
    mv "$workdir" "$ROOT/done/${model}-$(date -u +%Y%m%dT%H%M%S)"
    echo "saved $dest at run step $step"
    ;;
*)
    usage
    ;;
esac
