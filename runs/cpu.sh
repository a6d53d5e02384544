#!/bin/sh
# The CPU-sized protocol (about two hours on 2 cores), results in benchmarks/cpu/:
#   digits at 50 and 100 labels, every registered algorithm, seeds 1-3 (protocols/cpu_digits.flags);
#   Fashion-MNIST at 250 and 4000 labels, supervised, mean_teacher, vat and fixmatch, seed 1
#   (protocols/cpu_fashion_mnist.flags; needs `apt-get install dataset-fashion-mnist`).
# Both grids share one directory, so results.md has one table per dataset. Resumable.
# Extra arguments go to both commands, e.g. --algorithms=supervised,mean_teacher,vat.
# Usage (from anywhere): sh runs/cpu.sh [flags]
set -e
cd "$(dirname "$0")/.."
python -m ssl_ema.benchmark --flagfile=runs/protocols/cpu_digits.flags \
    --labels=50,100 --seeds=1,2,3 --out=benchmarks/cpu "$@"
python -m ssl_ema.benchmark --flagfile=runs/protocols/cpu_fashion_mnist.flags \
    --algorithms=supervised,mean_teacher,vat,fixmatch --labels=250,4000 --seeds=1 \
    --out=benchmarks/cpu "$@"
