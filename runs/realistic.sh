#!/bin/sh
# Unlabeled data as it really is (issue 29), CPU-sized, on Fashion-MNIST (needs `apt-get install
# dataset-fashion-mnist`). Resumable; results.md in each directory has the accuracy table and,
# for these protocols, balanced accuracy (long tail) or AUROC and (K+1)-way balanced accuracy
# (mismatch).
#   Long-tailed, gamma 100 (protocols/fashion_mnist_lt.flags), consistent and reversed pools:
#   supervised and fixmatch with seeds 1-3; abc and darp (issue 29) and crest, crest_plus, daso,
#   saw, debiaspl, cossl, adsh and acr (issue 30) with seed 1, each on --base_algorithm=fixmatch.
#   Class mismatch, classes 0-5 known (protocols/fashion_mnist_mismatch.flags), 0%, 50% and 100%
#   of the pool from classes 6-9: fixmatch with seeds 1-3, openmatch and iomatch with seed 1
#   (supervised never reads the pool: once, seeds 1-3).
# Extra arguments go to every command. Usage (from anywhere): sh runs/realistic.sh [flags]
set -e
cd "$(dirname "$0")/.."
for pool in consistent reversed; do
    out=benchmarks/fashion_mnist_lt_$pool
    python -m ssl_ema.benchmark --flagfile=runs/protocols/fashion_mnist_lt.flags \
        --pool_order=$pool --labels=3720 --algorithms=supervised,fixmatch --seeds=1,2,3 \
        --out=$out "$@"
    python -m ssl_ema.benchmark --flagfile=runs/protocols/fashion_mnist_lt.flags \
        --pool_order=$pool --labels=3720 --algorithms=abc,darp,crest,crest_plus,daso,saw,debiaspl,cossl,adsh,acr \
        --seeds=1 --out=$out "$@"
done
python -m ssl_ema.benchmark --flagfile=runs/protocols/fashion_mnist_mismatch.flags \
    --mismatch=0 --labels=600 --algorithms=supervised --seeds=1,2,3 \
    --out=benchmarks/fashion_mnist_mismatch "$@"
for mismatch in 0 0.5 1; do
    python -m ssl_ema.benchmark --flagfile=runs/protocols/fashion_mnist_mismatch.flags \
        --mismatch=$mismatch --labels=600 --algorithms=fixmatch --seeds=1,2,3 \
        --out=benchmarks/fashion_mnist_mismatch "$@"
    python -m ssl_ema.benchmark --flagfile=runs/protocols/fashion_mnist_mismatch.flags \
        --mismatch=$mismatch --labels=600 --algorithms=openmatch,iomatch --seeds=1 \
        --out=benchmarks/fashion_mnist_mismatch "$@"
done
