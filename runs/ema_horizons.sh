#!/bin/sh
# Which EMA? Mean Teacher on the CPU protocol with every average tracked: extra horizons
# 0.9, 0.99, 0.9999 beside the teacher's 0.999, Polyak over the last half, post-hoc EMA
# snapshots every kimg; then the post-hoc sweep of each run, the table and runs/ema_horizons.png.
# Usage: sh runs/ema_horizons.sh [seeds, default "1 2 3"] [--ema_bn modes, default "average"]
# Resumable: a finished run is left alone, an interrupted one continues.
set -e
cd "$(dirname "$0")/.."
OUT=benchmarks/ema/runs
SEEDS=${1:-1 2 3}
MODES=${2:-average}
AVERAGES="--algorithm=mean_teacher --ema_decays=0.9,0.99,0.9999 --polyak_start_fraction=0.5
          --posthoc_snapshot_every_kimg=1"
for seed in $SEEDS; do for bn in $MODES; do
  dir=$OUT/cpu_digits.50@$seed/mean_teacher_$bn
  python -m ssl_ema.train --flagfile=runs/protocols/cpu_digits.flags --labels=50 --seed=$seed \
      $AVERAGES --ema_bn=$bn --train_dir=$dir
  python -m ssl_ema.posthoc --train_dir=$dir
  dir=$OUT/cpu_fashion_mnist.250@$seed/mean_teacher_$bn
  python -m ssl_ema.train --flagfile=runs/protocols/cpu_fashion_mnist.flags --labels=250 \
      --seed=$seed $AVERAGES --ema_bn=$bn --train_dir=$dir
  python -m ssl_ema.posthoc --train_dir=$dir
done; done
python runs/ema_horizons.py benchmarks/ema --plot=runs/ema_horizons.png
