#!/bin/bash
# dcl eval --bank 5000 of each seed's run (tests/training.rs's protocol), once its pretraining is done.
cd "$(dirname "$0")/../.."
for s in 1 2 3 4 5; do
  out=runs/ci-seeds/seed-$s
  while [ ! -f $out/model.safetensors ]; do sleep 10; done
  [ -f results/ci-seeds/seed-$s.json ] || { ${DCL:-target/release/dcl} eval --run $out --bank 5000 > $out.json.tmp && mv $out.json.tmp results/ci-seeds/seed-$s.json; }
done
