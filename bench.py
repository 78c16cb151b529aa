"""Measurement on generated data and random weights, nothing written to disk. train times
train.py's step after 5 warm-up steps (1,024 generated 256-px images, iREPA on a random DINOv2-B,
a random SD-VAE, unless flags say otherwise).

    python bench.py train --model SiT-B/2 --batch-size 256      # any train.py flag may follow
    python bench.py train --model SiT-B/2 --batch-size 32 --repae --repae-vgg random \
        --repae-lpips random
    python bench.py sample --model SiT-B/2 --batch-size 256 [--compile] [--num-steps N]
    torchrun --nproc_per_node=8 bench.py train --model SiT-B/2 --batch-size 2048
"""
import argparse
import os
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
# these go before the flags given: argparse keeps a flag's last value
TRAIN = ["--encoder", "dinov2-vit-b", "--encoder-weights", "random", "--irepa", "--vae-weights",
         "random", "--num-generated", "1024", "--image-size", "256"]


def clock(device):  # the time once the GPU's queued work is done
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


def bench_train(argv):
    p = Parser("bench.py train: img/s, MFU and memory of train.py's step; train.py's flags too")
    p.add_argument("--bench-steps", type=at_least(1), default=40, help="timed steps")
    p.add_argument("--profile", action="store_true", help="kernel table of 3 more steps")
    b, argv = p.parse_known_args(argv)
    steps = str(5 + b.bench_steps + 3 * b.profile)  # --out-dir: a benchmark writes no run
    args = train.get_args([*TRAIN, *argv, "--steps", steps, "--out-dir", os.devnull])
    device, rank, world = setup_device()
    train.check_run(args, world)
    objective, encoder, vae, emas, opt = train.build(args, device)
    loader = train.load_data(args, vae, device, rank, world, 0)
    if device.type == "cuda":  # the peak of training, not of encoding the generated images
        torch.cuda.reset_peak_memory_stats()
    # FLOPs per image (network forward and backward, encoder forward)
    x, y, lat = (t[:2].to(device) if t is not None else None for t in loader.dataset[0])
    with FlopCounterMode(display=False) as counter:
        target = encoder(x) if encoder is not None else None  # fp32: bf16's fused GELU is missed
        if args.repae:  # one whole REPA-E step: its VAE, LPIPS and discriminator too
            objective.step(x, y, target)
        else:
            inp = vae.scale(lat.chunk(2, dim=1)[0]) if vae is not None else x.float() / 127.5 - 1
            with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                objective(inp, y, target)[0].backward()
            objective.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / 2
    train_step = train.make_step(args, objective, encoder, vae, emas, opt, device, world)
    profiler, marks = torch.profiler.profile(), []
    for i, batch in enumerate(loader):
        if i == 5 + b.bench_steps and rank == 0:  # then --profile's 3 steps
            profiler.start()
        train_step(*batch)
        if i in (4, 4 + b.bench_steps):  # before step 5 and after the timed steps
            marks.append(clock(device))
    cuda, nan = device.type == "cuda", float("nan")
    ips = b.bench_steps * args.batch_size / (marks[1] - marks[0]) / world
    mfu = ips * flops / PEAK_FLOPS if cuda else nan
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else nan
    if b.profile and rank == 0:
        profiler.stop()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=90))
    if rank == 0:
        print(f"BENCH {args.model} enc={args.encoder} proj={args.proj} batch={args.batch_size} "
              f"world={world} compile={args.compile} {args.precision}: {ips:.1f} img/s per GPU, "
              f"MFU {mfu:.1%}, peak memory {mem:.1f} GiB, {flops / 1e9:.0f} GFLOP/img")
    if world > 1:
        dist.destroy_process_group()


def bench_sample(argv):
    p = Parser("bench.py sample: img/s and memory of a sampler (no VAE), fp32 vs bf16")
    p.add_argument("--model", default="SiT-B/2", choices=models, metavar="NAME")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--num-steps", type=at_least(1), help="default: SiT 250 (SDE), JiT 50 (Heun)")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args(argv)
    device, family = setup_device()[0], a.model[:3].lower()
    mode, steps = ("heun", a.num_steps or 50) if family == "jit" else ("sde", a.num_steps or 250)
    net = build_model(a.model).to(device).eval().requires_grad_(False)
    for w in net.parameters():  # random: a fresh adaLN-Zero network outputs zeros
        torch.nn.init.normal_(w, std=0.02)
    y = torch.randint(net.num_classes, (a.batch_size,), device=device)
    cuda = device.type == "cuda"
    net = kernels.enable(net) if cuda else net
    net = torch.compile(net) if a.compile else net
    out = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            sample.sample_latents(net, y, family, mode, 2, 1.0, (0.0, 1.0))  # warm-up; no CFG
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0, gen = clock(device), torch.Generator(device).manual_seed(0)
            out[precision] = sample.sample_latents(net, y, family, mode, steps, 1.0, (0.0, 1.0),
                                                   noise_std(family, 256), gen).double()
            ips = a.batch_size / (clock(device) - t0)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(f"BENCH sample {a.model} {mode}-{steps} batch {a.batch_size} "
              f"{precision}: {ips:.2f} img/s, peak memory {mem:.1f} GiB")
    rel = (out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()
    print(f"bf16 vs fp32 relative L2 of the samples: {rel:.3e}")


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("what", choices=["train", "sample"])
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the mode's flags (bench.py MODE -h)")
    a = p.parse_args(argv)
    dict(train=bench_train, sample=bench_sample)[a.what](a.flags)


if __name__ == "__main__":
    main()
