#!/usr/bin/env bash
# GPU benchmarks behind the README's performance table (docs/PERFORMANCE.md tells the story): the real train.py
# loop on generated data with random encoder/VAE weights, the samplers and metrics.py at the table's sizes. Run from the repository root. Profiling modes (bytes, graphs, fastpaths): docs/profile.sh.
# usage: bash bench.sh [train|train-eager|meanflow|train-xl|scaling|ddp-resume|ddp-resume-eager|ddp-sample|sample|metrics] ...
#        (default: train-eager train sample metrics, one GPU), or bash bench.sh data (the memmap loader alone)
set -uo pipefail
export PYTHONUNBUFFERED=1
R="--encoder dinov2-vit-b --encoder-weights random --irepa --num-generated 1024 --image-size 256"
run() { echo "+ $*"; "$@" 2>&1 | grep -E "BENCH|img/s|GiB|rel|Error|error" ; }
[ "${1:-}" = data ] || for what in "${@:-train-eager train sample metrics}"; do for w in $what; do case $w in
  train-eager) run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 20 --no-compile ;;
  train)
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 128 --bench 40 --compile
    run python train.py --model JiT-B/16 $R --batch-size 256 --bench 30 --compile ;;
  meanflow)  # MeanFlow + iREPA (train.py --objective meanflow) beside the plain SiT-B/2 step
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile --objective meanflow
    run python train.py --model SiT-B/2 $R --vae-weights random --batch-size 256 --bench 40 --compile --objective meanflow \
      --mf-omega 1 --mf-kappa 0 ;;  # without guidance in training
  train-xl) run python train.py --model SiT-XL/2 $R --vae-weights random --batch-size 256 --bench 6 --compile --recompute 12 ;;
  scaling)  # same per-GPU batch on 1 and on all GPUs of the host
    n=$(nvidia-smi -L | wc -l)
    for m in "SiT-B/2 --vae-weights random" "JiT-B/16"; do b=$([ "$m" = JiT-B/16 ] && echo 128 || echo 256)
      CUDA_VISIBLE_DEVICES=0 run python train.py --model $m $R --batch-size $b --bench 30 --compile
      run torchrun --nproc_per_node=$n train.py --model $m $R --batch-size $((b * n)) --bench 30 --compile; done ;;
  ddp-resume|ddp-resume-eager)  # the used-by command on all GPUs: identical replicas, one checkpoint, resume continues
    # the losses (bit for bit eager; compiled runs differ in the last bits from run to run: README, Resume and checkpoints)
    n=$(nvidia-smi -L | wc -l); o=/tmp/ddp; rm -rf $o $o-r; e=$([ $w = ddp-resume-eager ] && echo --no-compile)
    C="torchrun --nproc_per_node=$n train.py $e --encoder dinov2-vit-b --irepa --model SiT-B/2 --encoder-weights random --vae-weights random --num-generated 1024 --batch-size $((64 * n)) --log-every 2 --sample-every 0"
    $C --steps 12 --ckpt-every 12 --out-dir $o 2>&1 | grep -E "replicas|Error"; ls $o/checkpoints
    $C --steps 6 --ckpt-every 6 --out-dir $o-r 2>&1 | grep -E "replicas|Error"
    torchrun --nproc_per_node=$n train.py $e --resume $o-r --steps 12 2>&1 | grep -E "replicas|Error"
    python -c "import json; a, b = ([json.loads(l)['loss'] for l in open(f'$o{s}/log.jsonl')] for s in ('', '-r')); print('losses', a, b, 'identical' if a == b else 'DIFFERENT, max relative %.1e' % max(abs(x - y) / abs(x) for x, y in zip(a, b)))" ;;
  ddp-sample)  # sample.py and fid.py on 1 and on all GPUs: the same npz and FID numbers (demo checkpoint, random Inception)
    n=$(nvidia-smi -L | wc -l); o=/tmp/ddps; rm -rf $o; mkdir -p $o; S="--ckpt $o/run --num-samples 40 --batch-size 8 --num-steps 5"
    F="--ref $o/ref.npz --inception $o/inc.pth --batch-size 7"
    python train.py --steps 30 --ckpt-every 30 --sample-every 0 --no-compile --out-dir $o/run > /dev/null 2>&1
    python -c "import numpy as np, torch, fid; np.savez('$o/ref.npz', np.random.default_rng(0).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)); torch.manual_seed(0); torch.save(fid.FIDInception().state_dict(), '$o/inc.pth')"
    python sample.py $S --out $o/s1.npz > /dev/null 2>&1; python fid.py $o/s1.npz $F --json $o/f1.json > /dev/null 2>&1
    torchrun --nproc_per_node=$n sample.py $S --out $o/sn.npz > /dev/null 2>&1
    torchrun --nproc_per_node=$n fid.py $o/sn.npz $F --json $o/fn.json > /dev/null 2>&1
    python -c "import json, numpy as np; a, b = np.load('$o/s1.npz'), np.load('$o/sn.npz'); print('npz identical on 1 and $n GPUs:', all(np.array_equal(a[k], b[k]) for k in a.files)); print(json.load(open('$o/f1.json'))); print(json.load(open('$o/fn.json')))" ;;
  sample)
    run python sample.py --bench --model SiT-B/2 --batch-size 256
    run python sample.py --bench --model SiT-B/2 --batch-size 256 --compile
    run python sample.py --bench --model SiT-XL/2 --batch-size 256 --num-steps 25 ;;
  metrics) echo "+ metrics"; /usr/bin/time -f "%e s wall" python metrics.py --encoder dinov2-vit-b --encoder-weights random --num-images 1000 2>&1 | tail -4 ;;
  *) echo "unknown mode $w (see the usage line at the top; data runs alone: bash bench.sh data)"; exit 2 ;;
esac; done; done
# data: the prepared-memmap loader alone (python snippet below, outside the training loop)
if [ "${1:-}" = data ]; then python - <<'PY'
import time, numpy as np, torch, data
n, R, B = 8192, 256, 256
img = np.lib.format.open_memmap("/tmp/bench_images.npy", "w+", np.uint8, (n, 3, R, R))
img[:] = np.random.default_rng(0).integers(0, 256, (1, 3, R, R), dtype=np.uint8); img.flush()
lat = np.lib.format.open_memmap("/tmp/bench_latents.npy", "w+", np.float32, (n, 8, R // 8, R // 8)); lat.flush()
img, lat = np.load("/tmp/bench_images.npy", mmap_mode="r"), np.load("/tmp/bench_latents.npy", mmap_mode="r")
for workers in (2, 4, 8):
    batches = data.Batches(img, np.zeros(n, np.int64), lat, B, 0, 1, 0, flip=True)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, sampler=range(60), prefetch_factor=4)
    for i, _ in enumerate(loader):
        t0 = time.time() if i == 10 else locals().get("t0")
    print(f"memmap loader, {workers} workers: {50 * B / (time.time() - t0):,.0f} img/s (256 px + SD-VAE posterior, page cache)")
PY
fi
