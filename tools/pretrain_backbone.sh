#!/usr/bin/env bash
# Pre-train the shipped backbone (OpenUS, VMamba small-fast) with the issue-12 recipe:
# τ_s 0.1, τ_t 0.04 → 0.07, per-batch standardisation in the head, 16-px mask cells.
# Data: BUSI + HC18 train/val images (the split `usfm-core finetune` makes; test images are never
# linked) + simulated B-mode frames, prepared by tools/shipped_models.py. Checkpoints every
# SAVE_EVERY steps; running the same command again resumes exactly where a stop left off.
#
#   bash tools/pretrain_backbone.sh                 # 6000 steps (≈ 2.5-3 h on 2 free cores)
#   bash tools/pretrain_backbone.sh --steps 12000   # a longer schedule (set once, keep it)
#   bash tools/pretrain_backbone.sh --hours 1       # stop after 1 h wall clock; rerun to go on
#   bash tools/pretrain_backbone.sh --dry-run       # the plan only
#   bash tools/pretrain_backbone.sh --method mae    # a baseline (mae | jepa) at the same budget:
#                                                   # same data, preset, steps and batch; its own
#                                                   # views and optimiser (docs/pretraining.md);
#                                                   # jepa's frozen teacher is the finished MAE
#                                                   # run's backbone (TEACHER to change it)
#
# Options / environment: --method M (METHOD, default openus; mae / jepa write to
# $HOME/usfm_runs/pretrain-small-fast-M), --steps N (STEPS, default 6000: epochs = N / 100), --hours H (HOURS:
# wall-clock budget of this sitting, default none), --out DIR (OUT, default
# $HOME/usfm_runs/pretrain-small-fast-i12: outside the checkout, which may be replaced between
# sessions), --data DIR (DATA, default $HOME/usfm_runs/data), SHARED (default ../shared/data),
# THREADS (default 2), SAVE_EVERY (default 50), extra `--set key=value` and `--max-steps N`
# passed through.
# When done: OUT/backbone is the backbone; OUT/log.csv has teacher_entropy_ratio/teacher_mi.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-6000}
HOURS=${HOURS:-}
METHOD=${METHOD:-openus}
OUT=${OUT:-}
DATA=${DATA:-$HOME/usfm_runs/data}
SHARED=${SHARED:-../shared/data}
SAVE_EVERY=${SAVE_EVERY:-50}
extra=()
dry=""
while [ $# -gt 0 ]; do
    case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --hours) HOURS=$2; shift 2 ;;
    --method) METHOD=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --dry-run) dry="--dry-run"; shift ;;
    --max-steps) extra+=(--max-steps "$2"); shift 2 ;;  # stop early (trials), schedules unchanged
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
export OMP_NUM_THREADS=${THREADS:-2}
case $METHOD in
openus) OUT=${OUT:-$HOME/usfm_runs/pretrain-small-fast-i12} ;;
mae|jepa) OUT=${OUT:-$HOME/usfm_runs/pretrain-small-fast-$METHOD} ;;
*) echo "--method must be openus, mae or jepa" >&2; exit 2 ;;
esac
if [ $((STEPS % 100)) -ne 0 ] || [ "$STEPS" -lt 200 ]; then
    echo "--steps must be a multiple of 100 and >= 200 (100 steps per epoch)" >&2; exit 2
fi

if [ ! -d "$DATA/pretrain/busi" ] || [ ! -d "$DATA/pretrain/hc18" ] || [ ! -d "$DATA/pretrain/sim" ]; then
    python tools/shipped_models.py prepare --shared "$SHARED" --out "$DATA"
fi

resume=""
if [ -f "$OUT/checkpoints/last/state.pt" ] || compgen -G "$OUT/checkpoints/.last.old-*" >/dev/null; then
    resume="--resume"
    echo "resuming $OUT"
fi
# The recipe: the small-fast preset (its defaults carry the issue-12 distillation fixes and
# 16-px mask cells) with the schedules stretched over STEPS steps; warm-ups scale with them.
epochs=$((STEPS / 100))
cmd=(usfm-core pretrain --config small-fast --method "$METHOD" --data "$DATA/pretrain" --out "$OUT"
     $resume $dry --set "epochs=$epochs" --set "steps_per_epoch=100" --set "save_every=$SAVE_EVERY"
     --set "log_every=10" --set "workers=1")
if [ "$METHOD" = jepa ]; then
    # SALT / US-JEPA: the frozen teacher is a domain encoder pretrained by reconstruction (URFM in
    # the paper; SALT's stage 1 is pixel reconstruction): here the MAE baseline's backbone, same
    # data. The predictor keeps the paper's depth (12) and its width ratio to the encoder
    # (384 / 768 = 1/2 of ViT-B's; small-fast's last stage is 256 wide → 128, 4 heads of 32).
    TEACHER=${TEACHER:-$HOME/usfm_runs/pretrain-small-fast-mae/backbone}
    if [ ! -f "$TEACHER/config.json" ]; then
        echo "JEPA needs its frozen teacher $TEACHER (the finished MAE run's backbone):" >&2
        echo "  run 'bash $0 --method mae' to the end first, or set TEACHER=<backbone folder>" >&2
        exit 2
    fi
    cmd+=(--set "jepa.teacher_ckpt=$TEACHER" --set "jepa.pred_dim=128" --set "jepa.pred_heads=4")
fi
if [ "$METHOD" = openus ]; then  # the baselines keep their papers' warm-ups (method_defaults)
    cmd+=(--set "loss.warmup_teacher_temp_epochs=$(( epochs / 10 > 2 ? epochs / 10 : 2 ))"
          --set "optim.warmup_epochs=$(( epochs / 20 > 1 ? epochs / 20 : 1 ))")
fi
cmd+=("${extra[@]}")
echo "${cmd[*]}"
if [ -n "$HOURS" ] && [ -z "$dry" ]; then
    secs=$(python -c "print(int(float('$HOURS') * 3600))")
    set +e
    timeout --signal=INT --kill-after=120 "$secs" "${cmd[@]}"
    rc=$?
    set -e
    if [ $rc -eq 124 ] || [ $rc -eq 130 ]; then
        echo "budget of $HOURS h reached; run the same command again to resume from the last checkpoint"
        exit 0
    fi
    exit $rc
fi
exec "${cmd[@]}"
