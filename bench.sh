#!/usr/bin/env bash
# GPU benchmarks behind the README's performance table: the real train.py loop on generated data with
# random encoder/VAE weights, and the samplers / encoders / FID Inception at the sizes SPEC.md names.
# usage: bash bench.sh [train|train-eager|encoders|sample|fid|metrics] ...   (all when no argument)
set -uo pipefail
export PYTHONUNBUFFERED=1
R="--encoder dinov2-vit-b --encoder-weights random --irepa --num-generated 1024 --image-size 256"
run() { echo "+ $*"; "$@" 2>&1 | grep -E "BENCH|img/s|GiB|rel|Error|error" ; }
for what in "${@:-train-eager train encoders sample fid metrics}"; do for w in $what; do case $w in
  train-eager) run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 20 ;;
  train)
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 128 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 256 --bench 30 --compile ;;
  train-xl) run python train.py --model SiT-XL/2 $R --vae-weights random --batch-size 256 --bench 10 --compile ;;
  encoders) run python encoders.py --bench ;;
  sample) run python sample.py --bench --model SiT-B/2 --batch-size 256 ;;
  fid) run python fid.py --bench ;;
  metrics) echo "+ metrics"; /usr/bin/time -f "%e s wall" python metrics.py --encoder dinov2-vit-b --encoder-weights random --num-images 1000 2>&1 | tail -4 ;;
esac; done; done
