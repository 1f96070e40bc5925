#!/usr/bin/env bash
# Train, evaluate and install the shipped models breast-lesion, fetal-head and breast-class.
# Every number in docs/models/*.md comes from these commands (one CPU thread, no GPU) and, for
# the validation comparisons, `python tools/shipped_models.py val MODEL --data ... --task ...`.
#
#   bash tools/train_shipped_models.sh prepare      # data folders (test images kept out)
#   bash tools/train_shipped_models.sh pretrain     # optional: the early local OpenUS run (~1 h)
#   bash tools/train_shipped_models.sh finetune pretrained|scratch [MODEL...]
#   bash tools/train_shipped_models.sh postprocess [ARM...]  # TTA, post-processing, input size: val
#   bash tools/train_shipped_models.sh install      # into the package (float16, sha256)
#   bash tools/train_shipped_models.sh evaluate [MODEL...]  # usfm-core evaluate: shipped vs scratch
#   bash tools/train_shipped_models.sh record       # metrics into index.json, tables into cards
#
# Environment: WORK (default work/), SHARED (default ../shared/data), THREADS (default 1),
# BACKBONE (default openus-small-fast: the final pre-trained backbone shipped in the package, so
# the pretrained arm needs no local pre-training; BACKBONE=work/runs/pretrain-small-fast gives
# the early local run the models were first trained from).
set -euo pipefail
WORK=${WORK:-work}
SHARED=${SHARED:-../shared/data}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
DATA=$WORK/data
RUNS=$WORK/runs
PRETRAIN=$RUNS/pretrain-small-fast
BACKBONE=${BACKBONE:-openus-small-fast}
usfm() { usfm-core --threads "$THREADS" "$@"; }

init_args() {  # the only difference between the two arms: where the backbone starts
    if [ "$1" = pretrained ]; then echo "--backbone $BACKBONE"; else echo "--preset small-fast"; fi
}

case "${1:?prepare|pretrain|finetune ARM|postprocess|install|evaluate|record}" in
prepare)
    python tools/shipped_models.py prepare --shared "$SHARED" --out "$DATA"
    ;;
pretrain)
    resume=""; [ -d "$PRETRAIN/checkpoints/last" ] && resume="--resume"
    usfm pretrain --config small-fast --data "$DATA/pretrain" --out "$PRETRAIN" $resume
    ;;
finetune)  # ARM [MODEL...]: models of one arm (default all three, in this order)
    arm=${2:?pretrained|scratch}
    shift 2
    for model in "${@:-breast-lesion fetal-head breast-class}"; do
      for m in $model; do
        case $m in
        breast-lesion)
            # shellcheck disable=SC2046
            usfm finetune --task seg --data "$DATA/busi" --out "$RUNS/breast-lesion-$arm" \
                $(init_args "$arm") --input-size 192 --epochs 16 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        fetal-head)
            # 224² and 20 epochs (was 192², 16; before that 160², 10): better on validation
            # (mean HC error 2.78 vs 2.97 mm without TTA, 2.64 vs 2.86 mm with it).
            # shellcheck disable=SC2046
            usfm finetune --task seg --data "$DATA/hc18" --out "$RUNS/fetal-head-$arm" \
                $(init_args "$arm") --input-size 224 --epochs 20 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        breast-class)
            # Starts from the same arm's breast-lesion backbone (a lesion-aware encoder), with
            # class-weighted cross-entropy: from the bare backbone neither arm left the
            # majority-class solution within this budget.
            usfm finetune --task cls --data "$DATA/busi" --out "$RUNS/breast-class-$arm" \
                --backbone "$RUNS/breast-lesion-$arm/model" --balanced --input-size 192 \
                --epochs 20 --batch-size 16 --lr 5e-4 --seeds 0
            ;;
        *) echo "unknown model $m" >&2; exit 2 ;;
        esac
      done
    done
    ;;
postprocess)  # [ARM...]: flip TTA, post-processing and inference size of the two segmenters,
    # chosen on the validation split (tools/shipped_models.py postprocess, infer-size) and
    # written into each run's model;
    # both arms get the same procedure so the comparison stays like for like. No presence gate
    # (--gates 0): chosen on validation at 0.7, breast-lesion's gate emptied 7 test lesion
    # images (docs/models/breast-lesion.md), so it stays an opt-in (segment --presence-gate).
    shift
    for arm in "${@:-pretrained scratch}"; do
      for a in $arm; do
        for pair in breast-lesion:busi:160,192,224 fetal-head:hc18:224,256; do
            n=${pair%%:*}; rest=${pair#*:}; data=${rest%%:*}; sizes=${rest#*:}
            [ -d "$RUNS/$n-$a/model" ] || continue
            rm -f "$RUNS/$n-$a/postprocess.json" "$RUNS/$n-$a/infer_size.json"  # this step's own
            python tools/shipped_models.py postprocess "$RUNS/$n-$a/model" --data "$DATA/$data" \
                --gates 0 --apply --out "$RUNS/$n-$a/postprocess.json"
            # then the inference input side (the training size and its neighbours), with the
            # TTA / post-processing just chosen: by HC error for fetal-head, Dice otherwise
            python tools/shipped_models.py infer-size "$RUNS/$n-$a/model" --data "$DATA/$data" \
                --sizes ${sizes//,/ } --apply --out "$RUNS/$n-$a/infer_size.json"
        done
      done
    done
    ;;
install)  # into src/usfm_core/assets/models (float16 weights, sha256 in index.json)
    python tools/shipped_models.py install breast-lesion fetal-head breast-class --runs "$RUNS"
    ;;
evaluate)  # [MODEL...]: the shipped weights vs the from-scratch baseline, same test items
    shift
    for name in "${@:-breast-lesion fetal-head breast-class}"; do
      for n in $name; do
        case $n in breast-lesion|breast-class) data=busi ;; fetal-head) data=hc18 ;;
            *) echo "unknown model $n" >&2; exit 2 ;; esac
        # Without a scratch run here, `record` keeps the baseline recorded earlier.
        baseline=(); [ -d "$RUNS/$n-scratch" ] && baseline=(--baseline "$RUNS/$n-scratch")
        usfm evaluate "$n" --splits "$RUNS/$n-pretrained/splits.json" "${baseline[@]}" \
            --data "$DATA/$data" --corruptions --out "$RUNS/report-$n"
      done
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
