#!/bin/bash
# The CI test's pretraining (tests/training.rs) over seeds 1-5 with $DCL (default
# target/release/dcl), into runs/ci-seeds/; eval.sh then scores them. Training does not depend on the probe.
set -e
cd "$(dirname "$0")/../.."
mkdir -p runs/ci-seeds
for s in 1 2 3 4 5; do
  out=runs/ci-seeds/seed-$s
  if [ ! -f $out/model.safetensors ]; then
    rm -rf $out
    ${DCL:-target/release/dcl} pretrain --data fashion-mnist --model resnet-mini --loss dcl --limit 5000 --epochs 3 \
      --batch-size 32 --optimizer adam --lr 0.001 --weight-decay 1e-6 --temperature 0.1 --crop-min-scale 0.2 \
      --device cpu --seed $s --out $out > $out.log 2>&1
    date >> runs/ci-seeds/times.log
  fi
done
