#!/usr/bin/env bash
# Train, evaluate and install the shipped models breast-lesion, fetal-head and breast-class.
# Every number in docs/models/*.md comes from these commands (2 CPU cores, no GPU).
#
#   bash tools/train_shipped_models.sh prepare      # data folders (test images kept out)
#   bash tools/train_shipped_models.sh pretrain     # OpenUS, VMamba small-fast, ~1 h on 1 core
#   bash tools/train_shipped_models.sh finetune pretrained|scratch [MODEL...]
#   bash tools/train_shipped_models.sh install      # into the package (float16, sha256)
#   bash tools/train_shipped_models.sh evaluate     # usfm-core evaluate: shipped vs scratch
#   bash tools/train_shipped_models.sh record       # metrics into index.json, tables into cards
#
# Environment: WORK (default work/), SHARED (default ../shared/data), THREADS (default 1).
set -euo pipefail
WORK=${WORK:-work}
SHARED=${SHARED:-../shared/data}
export OMP_NUM_THREADS=${THREADS:-1}
DATA=$WORK/data
RUNS=$WORK/runs
PRETRAIN=$RUNS/pretrain-small-fast

init_args() {  # the only difference between the two arms: where the backbone starts
    if [ "$1" = pretrained ]; then echo "--backbone $PRETRAIN"; else echo "--preset small-fast"; fi
}

case "${1:?prepare|pretrain|finetune ARM|install|evaluate|record}" in
prepare)
    python tools/shipped_models.py prepare --shared "$SHARED" --out "$DATA"
    ;;
pretrain)
    resume=""; [ -d "$PRETRAIN/checkpoints/last" ] && resume="--resume"
    usfm-core pretrain --config small-fast --data "$DATA/pretrain" --out "$PRETRAIN" $resume
    ;;
finetune)  # ARM [MODEL...]: models of one arm (default all three, in this order)
    arm=${2:?pretrained|scratch}
    shift 2
    for model in "${@:-breast-lesion fetal-head breast-class}"; do
      for m in $model; do
        case $m in
        breast-lesion)
            # shellcheck disable=SC2046
            usfm-core finetune --task seg --data "$DATA/busi" --out "$RUNS/breast-lesion-$arm" \
                $(init_args "$arm") --input-size 192 --epochs 16 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        fetal-head)
            # shellcheck disable=SC2046
            usfm-core finetune --task seg --data "$DATA/hc18" --out "$RUNS/fetal-head-$arm" \
                $(init_args "$arm") --input-size 160 --epochs 10 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        breast-class)
            # Starts from the same arm's breast-lesion backbone (a lesion-aware encoder), with
            # class-weighted cross-entropy: from the bare backbone neither arm left the
            # majority-class solution within this budget.
            usfm-core finetune --task cls --data "$DATA/busi" --out "$RUNS/breast-class-$arm" \
                --backbone "$RUNS/breast-lesion-$arm/model" --balanced --input-size 192 \
                --epochs 20 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        *) echo "unknown model $m" >&2; exit 2 ;;
        esac
      done
    done
    ;;
install)  # into src/usfm_core/assets/models (float16 weights, sha256 in index.json)
    python tools/shipped_models.py install breast-lesion fetal-head breast-class --runs "$RUNS"
    ;;
evaluate)  # the shipped weights vs the from-scratch baseline, same test items
    for task in breast-lesion:busi fetal-head:hc18 breast-class:busi; do
        name=${task%%:*}; data=${task##*:}
        usfm-core evaluate "$name" --splits "$RUNS/$name-pretrained/splits.json" \
            --baseline "$RUNS/$name-scratch" --data "$DATA/$data" --corruptions \
            --out "$RUNS/report-$name"
    done
    ;;
record)  # metrics + check subset into index.json, evaluate's table into the model cards
    python tools/shipped_models.py record breast-lesion fetal-head breast-class --runs "$RUNS" \
        --shared "$SHARED"
    python tools/shipped_models.py card breast-lesion fetal-head breast-class --runs "$RUNS"
    ;;
*)
    echo "unknown step $1" >&2; exit 2
    ;;
esac
