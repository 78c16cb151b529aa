#!/usr/bin/env bash
# GPU benchmarks behind the README's performance table: the real train.py loop on generated data with
# random encoder/VAE weights, and the samplers / encoders / FID Inception at the table's sizes.
# usage: bash bench.sh [train|train-eager|train-xl|scaling|ddp-resume[-eager]|encoders|sample|fid|metrics] ... (default: the
# single-GPU set), or bash bench.sh data (the memmap loader alone)
set -uo pipefail
export PYTHONUNBUFFERED=1
R="--encoder dinov2-vit-b --encoder-weights random --irepa --num-generated 1024 --image-size 256"
run() { echo "+ $*"; "$@" 2>&1 | grep -E "BENCH|img/s|GiB|rel|Error|error" ; }
[ "${1:-}" = data ] || for what in "${@:-train-eager train encoders sample fid metrics}"; do for w in $what; do case $w in
  train-eager) run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 20 --no-compile ;;
  train)
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 128 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 256 --bench 30 --compile ;;
  train-xl) run python train.py --model SiT-XL/2 $R --vae-weights random --batch-size 256 --bench 6 --compile --recompute 12 ;;
  scaling)  # same per-GPU batch on 1 and on all GPUs of the host
    n=$(nvidia-smi -L | wc -l)
    CUDA_VISIBLE_DEVICES=0 run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 30 --compile
    run torchrun --nproc_per_node=$n train.py --model SiT-B/2 $R --vae-weights random --batch-size $((256 * n)) --bench 30 --compile ;;
  ddp-resume|ddp-resume-eager)  # the used-by command on all GPUs: identical replicas, one checkpoint, resume continues
    # the losses (bit for bit eager; compiled runs differ in the last bits from run to run: README, Resume)
    n=$(nvidia-smi -L | wc -l); o=/tmp/ddp; rm -rf $o $o-r; e=$([ $w = ddp-resume-eager ] && echo --no-compile)
    C="torchrun --nproc_per_node=$n train.py $e --encoder dinov2-vit-b --irepa --model SiT-B/2 --encoder-weights random --vae-weights random --num-generated 1024 --batch-size $((64 * n)) --log-every 2 --sample-every 0"
    $C --steps 12 --ckpt-every 12 --out-dir $o 2>&1 | grep -E "replicas|Error"; ls $o/checkpoints
    $C --steps 6 --ckpt-every 6 --out-dir $o-r 2>&1 | grep -E "replicas|Error"
    torchrun --nproc_per_node=$n train.py $e --resume $o-r --steps 12 2>&1 | grep -E "replicas|Error"
    python -c "import json; a, b = ([json.loads(l)['loss'] for l in open(f'$o{s}/log.jsonl')] for s in ('', '-r')); print('losses', a, b, 'identical' if a == b else 'DIFFERENT, max relative %.1e' % max(abs(x - y) / abs(x) for x, y in zip(a, b)))" ;;
  encoders) run python encoders.py --bench ;;
  sample)
    run python sample.py --bench --model SiT-B/2 --batch-size 256
    run python sample.py --bench --model SiT-B/2 --batch-size 256 --compile
    run python sample.py --bench --model SiT-XL/2 --batch-size 256 --num-steps 25 ;;
  fid) run python fid.py --bench ;;
  metrics) echo "+ metrics"; /usr/bin/time -f "%e s wall" python metrics.py --encoder dinov2-vit-b --encoder-weights random --num-images 1000 2>&1 | tail -4 ;;
esac; done; done
# data: the prepared-memmap loader alone (python snippet below, outside the training loop)
if [ "${1:-}" = data ]; then python - <<'PY'
import time, numpy as np, torch, train
n, R, B = 8192, 256, 256
img = np.lib.format.open_memmap("/tmp/bench_images.npy", "w+", np.uint8, (n, 3, R, R))
img[:] = np.random.default_rng(0).integers(0, 256, (1, 3, R, R), dtype=np.uint8); img.flush()
lat = np.lib.format.open_memmap("/tmp/bench_latents.npy", "w+", np.float32, (n, 8, R // 8, R // 8)); lat.flush()
img, lat = np.load("/tmp/bench_images.npy", mmap_mode="r"), np.load("/tmp/bench_latents.npy", mmap_mode="r")
for workers in (2, 4, 8):
    data = train.Batches(img, np.zeros(n, np.int64), lat, B, 0, 1, 0, flip=True)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, sampler=range(60), prefetch_factor=4)
    for i, _ in enumerate(loader):
        t0 = time.time() if i == 10 else locals().get("t0")
    print(f"memmap loader, {workers} workers: {50 * B / (time.time() - t0):,.0f} img/s (256 px + SD-VAE posterior, page cache)")
PY
fi
