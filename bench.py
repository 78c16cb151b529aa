"""
Measurement on generated data and random weights; nothing is written to disk.

    python bench.py train --model SiT-B/2 --batch-size 256      # any train.py flag may follow
    python bench.py train --model JiT-B/16 --batch-size 128
    python bench.py train --model SiT-B/2 --batch-size 256 --objective meanflow
    python bench.py sample --model SiT-B/2 --batch-size 256 [--compile] [--num-steps N]
    python bench.py metrics --num-images 1000
    torchrun --nproc_per_node=8 bench.py train --model SiT-B/2 --batch-size 2048

train: train.py's own step, 5 warm-up steps then --bench-steps timed ones (--profile: the kernel
table of 3 more), with a random DINOv2-B target, iREPA, a random SD-VAE and 1,024 generated
images at 256 px unless flags say otherwise. MFU: useful FLOPs (no recomputation) / PEAK_FLOPS.
Scaling: the same per-GPU batch on one GPU and under torchrun.
Checks on GPUs: an eager torchrun run of train.py resumed halfway (--no-compile, --resume) logs
the losses of the uninterrupted one; sample.py and fid.py under torchrun write the npz and FID of
one GPU.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import kernels
import sample
import train
from data import Parser, at_least, setup_device
from model import build_model, models, noise_std

PEAK_FLOPS = 800e12  # MFU's denominator: a practical H100 bf16 rate (dense datasheet: 989e12)
TRAIN = {"--encoder": "dinov2-vit-b", "--encoder-weights": "random", "--irepa": None,
         "--vae-weights": "random", "--num-generated": "1024", "--image-size": "256"}
METRICS = {"--encoder": "dinov2-vit-b", "--encoder-weights": "random"}


def fill(argv, defaults):
    """argv with each flag of defaults that it lacks."""
    for flag, value in defaults.items():
        if not any(a.split("=")[0] == flag for a in argv):
            argv = [*argv, flag] if value is None else [*argv, flag, value]
    return argv


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


def count_flops(objective, encoder, vae, batch, device, amp):
    """Training FLOPs per image: the network's forward and backward, the encoder's forward."""
    x, y, lat = (t[:2].to(device) if t is not None else None for t in batch)
    inp = vae.scale(lat.chunk(2, dim=1)[0]) if vae is not None else x.float() / 127.5 - 1
    recompute, objective.net.recompute = objective.net.recompute, 0  # useful FLOPs only
    with FlopCounterMode(display=False) as counter:
        target = encoder(x) if encoder is not None else None  # fp32: bf16's fused GELU is missed
        with amp:
            objective(inp, y, target)[0].backward()
    objective.net.recompute = recompute
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bench_train(argv):
    p = Parser("bench.py train: img/s, MFU and memory of train.py's step; train.py's flags too")
    p.add_argument("--bench-steps", type=at_least(1), default=40, help="timed steps")
    p.add_argument("--profile", action="store_true", help="kernel table of 3 more steps")
    b, argv = p.parse_known_args(argv)
    nowhere = os.path.join(tempfile.gettempdir(), "bench-writes-nothing")  # no run folder made
    steps = 5 + b.bench_steps + 3 * b.profile
    args = train.get_args([*fill(argv, TRAIN), "--steps", str(steps), "--out-dir", nowhere])
    device, rank, world = setup_device()
    train.check_run(args, world)
    objective, encoder, vae, emas, opt = train.build(args, device)
    loader = train.load_data(args, vae, device, rank, world, 0)
    train_step = train.make_step(args, objective, encoder, vae, emas, opt, device, world)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    profiler, marks = torch.profiler.profile(), []
    for i, batch in enumerate(loader):
        if i == 0:
            flops = count_flops(objective, encoder, vae, batch, device, amp)
        if i in (5, 5 + b.bench_steps):
            marks.append(clock(device))
        if i == 5 + b.bench_steps:  # --profile's steps
            profiler.start()
        train_step(*batch)
    marks.append(clock(device))
    cuda, nan = device.type == "cuda", float("nan")
    ips = b.bench_steps * args.batch_size / (marks[1] - marks[0]) / world
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else nan
    if b.profile:
        profiler.stop()
    if b.profile and rank == 0:
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=90))
    if rank == 0:
        print(f"BENCH {args.model} enc={args.encoder} proj={args.proj} batch={args.batch_size} "
              f"world={world} compile={args.compile} {args.precision}: {ips:.1f} img/s per GPU, "
              f"MFU {ips * flops / PEAK_FLOPS if cuda else nan:.1%}, peak memory {mem:.1f} GiB, "
              f"{flops / 1e9:.0f} GFLOP/img")
    if world > 1:
        dist.destroy_process_group()


def bench_sample(argv):
    p = Parser("bench.py sample: img/s and peak memory of a sampler alone (no VAE), fp32 "
               "(TF32 on a GPU) vs bf16, and the relative L2 between their samples")
    p.add_argument("--model", default="SiT-B/2", choices=models, metavar="NAME")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--num-steps", type=at_least(1), help="default: SiT 250, JiT 50")
    p.add_argument("--mode", choices=["sde", "ode", "heun"], help="default: SiT sde, JiT heun")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    device, family = setup_device()[0], a.model[:3].lower()
    mode = a.mode or ("heun" if family == "jit" else "sde")
    steps = a.num_steps or (50 if family == "jit" else 250)
    torch.manual_seed(0)
    net = build_model(a.model)
    for w in net.parameters():  # random: a fresh adaLN-Zero network outputs zeros
        torch.nn.init.normal_(w, std=0.02)
    y = torch.randint(net.num_classes, (a.batch_size,), generator=torch.Generator().manual_seed(0))
    net, y = net.to(device).eval().requires_grad_(False), y.to(device)
    net = kernels.enable(net) if device.type == "cuda" else net
    net = torch.compile(net) if a.compile else net
    out = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            sample.sample_latents(net, y, family, mode, 2, a.cfg_scale, (0.0, 1.0))  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0, gen = clock(device), torch.Generator(device).manual_seed(0)
            out[precision] = sample.sample_latents(net, y, family, mode, steps, a.cfg_scale,
                                                   (0.0, 1.0), noise_std(family, 256), gen)
            ips = a.batch_size / (clock(device) - t0)
        cuda = device.type == "cuda"
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(f"BENCH sample {a.model} {mode}-{steps} cfg {a.cfg_scale} batch {a.batch_size} "
              f"{precision}: {ips:.2f} img/s, peak memory {mem:.1f} GiB")
    fp32, bf16 = out["fp32"].double(), out["bf16"].double()
    print(f"bf16 vs fp32 relative L2 of the samples: {(bf16 - fp32).norm() / fp32.norm():.3e}")


def bench_metrics(argv):
    """Wall time of metrics.py in a fresh process, feature extraction included."""
    metrics = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics.py")
    t0 = time.time()
    subprocess.run([sys.executable, metrics, *fill(argv, METRICS)], check=True)
    print(f"BENCH metrics {' '.join(argv)}: {time.time() - t0:.1f} s wall")


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("what", choices=["train", "sample", "metrics"])
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the mode's flags (bench.py MODE -h)")
    a = p.parse_args(argv)
    if a.what == "train":
        bench_train(a.flags)
    elif a.what == "sample":
        bench_sample(a.flags)
    else:
        bench_metrics(a.flags)


if __name__ == "__main__":
    main()
