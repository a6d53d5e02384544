#!/bin/sh
# The published protocols: CIFAR-10 at 40, 250 and 4000 labels, SVHN at 250, 1000 and 4000, WRN-28-2,
# every algorithm with the anchors' settings (runs/algorithms/), 5 seeds, 2^16 kimg per run
# (GPU-sized: about 1M steps each). Resumable: run it again after an interruption.
# Extra arguments go to every command, e.g. --jobs=2 or --algorithms=fixmatch,mean_teacher.
# Usage (from the repository root): sh runs/published.sh [flags]
set -e
cd "$(dirname "$0")/.."
python -m ssl_ema.benchmark --flagfile=runs/protocols/cifar10.flags \
    --algorithm_flags=runs/algorithms --labels=40,250,4000 --seeds=1,2,3,4,5 \
    --out=benchmarks/cifar10 "$@"
python -m ssl_ema.benchmark --flagfile=runs/protocols/svhn.flags \
    --algorithm_flags=runs/algorithms --labels=250,1000,4000 --seeds=1,2,3,4,5 \
    --out=benchmarks/svhn "$@"
