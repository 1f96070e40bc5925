#!/usr/bin/env bash
# Train, evaluate and install the shipped models breast-lesion, fetal-head and breast-class.
# Every number in docs/models/*.md comes from these commands (2 CPU cores, no GPU).
#
#   bash tools/train_shipped_models.sh prepare      # data folders (test images kept out)
#   bash tools/train_shipped_models.sh pretrain     # OpenUS, VMamba small-fast, ~1 h on 1 core
#   bash tools/train_shipped_models.sh finetune pretrained|scratch
#   bash tools/train_shipped_models.sh evaluate     # usfm-core evaluate, pretrained vs scratch
#   bash tools/train_shipped_models.sh install      # into the package + model cards' tables
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

case "${1:?prepare|pretrain|finetune ARM|evaluate|install}" in
prepare)
    python tools/shipped_models.py prepare --shared "$SHARED" --out "$DATA"
    ;;
pretrain)
    resume=""; [ -d "$PRETRAIN/checkpoints/last" ] && resume="--resume"
    usfm-core pretrain --config small-fast --data "$DATA/pretrain" --out "$PRETRAIN" $resume
    ;;
finetune)
    arm=${2:?pretrained|scratch}
    # shellcheck disable=SC2046
    usfm-core finetune --task seg --data "$DATA/busi" --out "$RUNS/breast-lesion-$arm" \
        $(init_args "$arm") --input-size 192 --epochs 16 --batch-size 16 --lr 5e-4 --seeds 0
    # shellcheck disable=SC2046
    usfm-core finetune --task seg --data "$DATA/hc18" --out "$RUNS/fetal-head-$arm" \
        $(init_args "$arm") --input-size 160 --epochs 10 --batch-size 16 --lr 5e-4 --seeds 0
    # shellcheck disable=SC2046
    usfm-core finetune --task cls --data "$DATA/busi" --out "$RUNS/breast-class-$arm" \
        $(init_args "$arm") --input-size 192 --epochs 12 --batch-size 16 --lr 5e-4 --seeds 0
    ;;
evaluate)  # the pretrained model and its from-scratch baseline on the same test items
    for task in breast-lesion:busi fetal-head:hc18 breast-class:busi; do
        name=${task%%:*}; data=${task##*:}
        usfm-core evaluate "$RUNS/$name-pretrained" --baseline "$RUNS/$name-scratch" \
            --data "$DATA/$data" --split test --corruptions --out "$RUNS/report-$name"
    done
    ;;
install)  # copy into src/usfm_core/assets/models + index.json; fill the model cards' tables
    python tools/shipped_models.py install breast-lesion fetal-head breast-class --runs "$RUNS"
    python tools/shipped_models.py card breast-lesion fetal-head breast-class --runs "$RUNS"
    ;;
*)
    echo "unknown step $1" >&2; exit 2
    ;;
esac
