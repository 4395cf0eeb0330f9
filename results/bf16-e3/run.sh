#!/bin/bash
# f32 against bf16-mixed, paired seeds, on the CPU (the roundings CUDA's bf16 layers make).
# From the repository root; DCL: the binary (built at commit d553c64 for these results).
DCL=${DCL:-target/release/dcl}
mkdir -p runs/bf16
for seed in 1 2 3; do
  for p in f32 bf16-mixed; do
    out=runs/bf16/$p-s$seed
    [ -f $out/DONE ] && continue
    "$DCL" pretrain --data fashion-mnist --limit 5000 --model resnet-mini --loss dcl --epochs 3 \
      --batch-size 64 --optimizer adam --lr 0.001 --weight-decay 1e-6 --temperature 0.1 --crop-min-scale 0.2 \
      --eval-images 2000 --device cpu --seed $seed --precision $p --out $out $( [ -d $out ] && echo --resume ) \
      > $out.log 2>&1 && touch $out/DONE
  done
done
