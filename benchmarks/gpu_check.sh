#!/usr/bin/env bash
# The GPU check: on one GPU in at most ~8 minutes, prove the CUDA paths end to end and measure them.
#   1. train the `small` UNet on the full Fashion-MNIST training split for a fixed time budget (Ctrl-C at the budget;
#      checkpoint_last.pth / checkpoint.pth hold the finished epochs),
#   2. reconstruct N validation, Fashion-MNIST test and MNIST test images at skip factor 16 on the full PLMS path and
#      run ood_detection.py,
#   3. the reconstruction speed benchmark for `small` at batch 256 (reference loop vs batched engine, fp32 agreement),
#   4. training images/s per precision (fp32, tf32, bf16, fp16),
# and write every figure to one file, $RESULTS/gpu_check.txt (default benchmarks/results/).
#
#   DATA=runs/quickstart/data bash benchmarks/gpu_check.sh          # on a GPU machine, after the quickstart's data step
#   GPU_CHECK_SMOKE=1 DATA=... bash benchmarks/gpu_check.sh          # CPU smoke mode: tiny preset, seconds per step
#
# DATA must hold data_splits/FashionMNIST_{train,val,test}.csv and data_splits/MNIST_test.csv (get_datasets.py).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
DATA="${DATA:-runs/quickstart/data}"
SPLITS="$DATA/data_splits"
RESULTS="${RESULTS:-benchmarks/results}"
WORK="${WORK:-$RESULTS/gpu_check_runs}"
PYTHON="${PYTHON:-python}"
if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
  DEVICE=cpu PRESET=tiny TRAIN_BUDGET_S=20 TRAIN_BATCH=8 N_IMAGES=4 RECON_BATCH=4
  BENCH=(--quick --device=cpu --skip_factor=32 --batch_size=2 --reference_images=1)
  TRAIN_SPEED=(--presets=tiny --batch_size=8 --steps=2 --warmup=1 --device=cpu --precisions=fp32,bf16)
  SCHEDULE_STEPS=(--num_inference_steps=20 --inference_skip_factor=16)
else
  DEVICE=cuda PRESET=small TRAIN_BUDGET_S=150 TRAIN_BATCH=512 N_IMAGES=500 RECON_BATCH=256
  BENCH=(--preset=small --device=cuda --batch_size=256 --skip_factor=16 --reference_images=16)
  TRAIN_SPEED=(--presets=small --batch_size=512 --steps=20 --warmup=3 --device=cuda)
  SCHEDULE_STEPS=(--num_inference_steps=100 --inference_skip_factor=16)
fi
for f in FashionMNIST_train FashionMNIST_val FashionMNIST_test MNIST_test; do
  [ -f "$SPLITS/$f.csv" ] || { echo "error: $SPLITS/$f.csv not found; prepare the data with get_datasets.py" >&2; exit 2; }
done
mkdir -p "$RESULTS" "$WORK"
REPORT="$RESULTS/gpu_check.txt"
: > "$REPORT.partial"
say() { echo "$*" | tee -a "$REPORT.partial"; }
started=$(date +%s)
SCHEDULE=(--beta_schedule=scaled_linear_beta --beta_start=0.0015 --beta_end=0.0195)

say "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=${GPU_CHECK_SMOKE:-0}"
"$PYTHON" - <<'EOF' | tee -a "$REPORT.partial"
import torch
from ddpm_ood.devices import describe_device, resolve_device
device = resolve_device("auto")
print(f"device: {describe_device(device)}")
print(f"torch: {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
EOF

say "## 1. train $PRESET on $SPLITS/FashionMNIST_train.csv for ${TRAIN_BUDGET_S}s"
t0=$(date +%s)
# The budget ends with SIGINT: the loop finishes nothing half-way and checkpoint_last.pth holds the last whole epoch.
timeout --signal=INT "$TRAIN_BUDGET_S" "$PYTHON" train_ddpm.py --output_dir="$WORK" --model_name=check \
  --training_ids="$SPLITS/FashionMNIST_train.csv" --validation_ids="$SPLITS/FashionMNIST_val.csv" \
  --is_grayscale=1 --model_type="$PRESET" --batch_size="$TRAIN_BATCH" --n_epochs=1000 --eval_freq=1 \
  --checkpoint_every=0 --lr=1e-4 --ema_decay=0.999 --amp=1 --device="$DEVICE" --sample_steps=0 \
  "${SCHEDULE[@]}" 2>&1 | tr '\r' '\n' | grep -E "^(device|epoch [0-9]+/|interrupted|trained|error)" \
  | tee -a "$REPORT.partial" || true
say "train_wall_s: $(( $(date +%s) - t0 ))"
[ -f "$WORK/check/checkpoint.pth" ] || { say "error: no epoch finished within the training budget"; exit 1; }

say "## 2. reconstruct $N_IMAGES images per set (skip factor 16, full PLMS path) and detect"
t0=$(date +%s)
"$PYTHON" reconstruct.py --output_dir="$WORK" --model_name=check --device="$DEVICE" --amp=1 \
  --validation_ids="$SPLITS/FashionMNIST_val.csv" --in_ids="$SPLITS/FashionMNIST_test.csv" \
  --out_ids="$SPLITS/MNIST_test.csv" --first_n_val="$N_IMAGES" --first_n="$N_IMAGES" \
  --batch_size="$RECON_BATCH" --num_workers=2 "${SCHEDULE_STEPS[@]}" 2>&1 | tr '\r' '\n' \
  | grep -E "^(device|wrote|error)" | tee -a "$REPORT.partial"
say "reconstruct_wall_s: $(( $(date +%s) - t0 ))"
"$PYTHON" ood_detection.py --output_dir="$WORK" --model_name=check | grep -E "AUC|MNIST " | tee -a "$REPORT.partial"

say "## 3. reconstruction speed: reference loop vs batched engine"
"$PYTHON" benchmarks/reconstruct_speed.py "${BENCH[@]}" 2>/dev/null | tee -a "$REPORT.partial"

say "## 4. training images/s per precision"
"$PYTHON" benchmarks/train_speed.py "${TRAIN_SPEED[@]}" 2>/dev/null | tee -a "$REPORT.partial"

say "total_wall_s: $(( $(date +%s) - started ))"
mv "$REPORT.partial" "$REPORT"
echo "wrote $REPORT"
