"""
The run folder around train.py's loop, which an iREPA reader can skip: the refusals made before
any work, a resumed run's settings, the console's opening lines and args.json, Ctrl-C.
"""
import glob
import importlib.util
import json
import os
import shutil
import signal
import time

import torch

from data import NUM_GENERATED_CLASSES, prepared_folder, readable_checkpoint
from model import build_model, in_latent_space

IMAGENET = os.path.join("data", "imagenet", "train")  # the official repositories' layout
# a resume continues a run as it was: these define its model, method and data order
FIXED_ON_RESUME = ("model", "objective", "image_size", "num_classes", "encoder", "irepa", "proj",
                   "encoder_depth", "vae_stats", "ema", "batch_size", "seed", "num_generated",
                   "repae", "vae_lr", "disc_lr")


def vae_name(args):
    """The VAE of SiT's prepared latents: a file (absolute path), "random" or the hub's."""
    latents = in_latent_space(args.model) and not args.repae
    vae = args.vae_weights or "stabilityai/sd-vae-ft-mse" if latents else None
    return os.path.abspath(vae) if vae and os.path.isfile(vae) else vae


def check_run(args, world):
    """The refusals that need no built module: a run that cannot go stops before any work."""
    token_px = int(args.model.split("/")[-1]) * (8 if in_latent_space(args.model) else 1)
    grid, want, align_to = args.image_size // token_px, args.image_size // 16, args.encoder
    with torch.device("meta"):  # the network's depth, without its weights
        blocks = len(build_model(args.model).blocks)
    ours = ("checkpoints", "log.jsonl", "args.json", "curves.png", "samples")  # what a run writes
    run = any(os.path.exists(os.path.join(args.out_dir, f)) for f in ours)
    mf = args.objective == "meanflow"
    eager_bf16 = args.precision == "bf16" and not args.compile and torch.cuda.is_available()
    if args.data_path and os.path.isdir(args.data_path):  # labels 0..C-1: the class folders
        classes = sum(entry.is_dir() for entry in os.scandir(args.data_path))
    else:  # the generated shapes' labels cycle through their classes
        classes = min(args.num_generated or 0, NUM_GENERATED_CLASSES)
    for bad, message in [
        (args.batch_size % world,
         f"--batch-size {args.batch_size} is not divisible by the world size {world}"),
        (args.data_path and not os.path.isdir(args.data_path), f"no --data-path {args.data_path}"),
        (os.path.isfile(args.out_dir), f"--out-dir {args.out_dir} is a file, not a folder"),
        (args.num_generated and args.num_generated < args.batch_size, f"--num-generated "
         f"{args.num_generated} is below --batch-size {args.batch_size}: a step takes a batch"),
        (args.image_size % token_px, f"--image-size {args.image_size}: {args.model} needs a "
         f"multiple of {token_px}"),
        (align_to != "none" and grid != want, f"{args.model} has a {grid}x{grid} token grid, "
         f"{align_to} {want}x{want}: use SiT-*/2, JiT-*/16 or --encoder none"),
        (align_to != "none" and args.encoder_depth > blocks,
         f"--encoder-depth {args.encoder_depth}: {args.model} has {blocks} blocks"),
        (run and not args.resume and not args.start_over, f"--out-dir {args.out_dir} holds a "
         f"run: --resume {args.out_dir}, another --out-dir, or --start-over to move it aside"),
        (mf and args.model[:3] != "SiT", f"--objective meanflow trains SiT, not {args.model}"),
        (mf and eager_bf16, "--objective meanflow: eager bf16 attention fails under jvp on a GPU: "
         "keep --compile or pass --precision fp32"),
        (mf and args.mf_interval[0] > args.mf_interval[1], "--mf-interval: LOW is above HIGH"),
        (args.repae and (mf or align_to == "none" or not in_latent_space(args.model)),
         "--repae trains SiT-*/N (flow) with an --encoder"),
        (args.repae and not (args.repae_vgg and args.repae_lpips),
         "--repae needs LPIPS's files: --repae-vgg and --repae-lpips"),
        (args.irepa and align_to == "none", "--irepa aligns to an encoder: pass --encoder NAME"),
        (not args.data_path and args.num_generated is None, f"no data for the paper's "
         f"{args.model} run with encoder {args.encoder}: pass --data-path (class folders; "
         f"default {IMAGENET}) or --num-generated N; the offline demo is: python train.py"),
        (args.wandb and not importlib.util.find_spec("wandb"), "--wandb needs: pip install wandb"),
        (classes > args.num_classes, f"the data has {classes} classes but --num-classes is "
         f"{args.num_classes}: pass at least {classes}"),
    ]:
        if bad:
            raise SystemExit(message)
    if args.data_path:  # its prepared arrays must hold this data, size and VAE's latents
        args.prepared_dir = prepared_folder(args.data_path, args.image_size, vae_name(args),
                                            args.out_dir, args.prepared_dir)


def resumed(p, argv, path):
    """The run's saved settings, then the flags given now: each change said, or refused where it
    is FIXED_ON_RESUME. The run goes on in the folder its checkpoint is in."""
    try:
        path, ck = readable_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--resume: {e}")
    flags = vars(p.parse_args([]))  # the saved settings that are flags today
    p.set_defaults(**{k: v for k, v in ck["args"].items() if k in flags})
    if os.path.basename(os.path.dirname(path)) == "checkpoints":
        p.set_defaults(out_dir=os.path.dirname(os.path.dirname(path)))
    if not os.path.isdir(ck["args"].get("prepared_dir") or ""):  # moved: the one beside the run
        p.set_defaults(prepared_dir=None)
    run, args = p.parse_args([]), p.parse_args(argv)
    for k in vars(args):
        old, new, flag = getattr(run, k), getattr(args, k), "--" + k.replace("_", "-")
        if old == new or k in ("resume", "start_over"):
            continue
        if k in FIXED_ON_RESUME:
            p.error(f"--resume continues a run as it was, but {flag} {new} differs from the "
                    f"run's {old}: drop the flag, or start a new run")
        if os.environ.get("RANK", "0") == "0":
            print(f"resume changes {flag}: {old} -> {new}")
    if ck["step"] >= args.steps:
        p.error(f"--resume {path} is at step {ck['step']} already: pass --steps above it to go on")
    args.resume = path
    return args


def rewind(run, step):
    """A resume at `step`: the log's records past it dropped (a killed run logs past its
    checkpoint). Later checkpoints (the run went on from here once) would be overwritten or mixed
    with the new ones: they move aside, beside a copy of the whole log."""
    log = os.path.join(run, "log.jsonl")
    later = [f for f in glob.glob(os.path.join(run, "checkpoints", "*.pt"))
             if os.path.basename(f) > f"{step:07d}.pt"]
    if later:
        aside = os.path.join(run, f"after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for f in later:
            os.replace(f, os.path.join(aside, os.path.basename(f)))
        if os.path.exists(log):
            shutil.copy(log, aside)
        print(f"resuming at step {step}: the later checkpoints and the log are kept in {aside}")
    if os.path.exists(log):
        whole = [line for line in open(log) if line.endswith("\n")]  # a kill may cut the last
        with open(log + ".tmp", "w") as f:
            f.writelines(line for line in whole if json.loads(line)["step"] <= step)
        os.replace(log + ".tmp", log)


def open_run(args, opt, step, world, device):
    """Says what runs in a few lines, readies the run folder (--start-over moves an old run
    aside), writes every setting into its args.json; --wandb's run, or None."""
    method, gamma = "none", args.spnorm_gamma
    if args.encoder != "none":
        method = (f"{'iREPA' if args.irepa else 'REPA'} to {args.encoder} after block "
                  f"{args.encoder_depth}: {args.proj} projector, coeff {args.proj_coeff}, "
                  f"spatial norm {'off' if gamma is None else f'gamma {gamma}'}")
    method += ", REPA-E" * args.repae
    num_params = sum(p.numel() for p in opt.param_groups[0]["params"])
    print(f"model: {args.model} ({args.objective}), {num_params:,} trainable parameters")
    print(f"data: {args.data_path} (prepared in {args.prepared_dir})" if args.data_path else
          f"data: {args.num_generated} generated shapes, the offline demo's data (no "
          f"--data-path, no {IMAGENET}); for the paper's run pass --data-path /imagenet/train")
    print(f"method: {method}")
    print(f"run: {args.out_dir}, {args.steps:,} steps of batch {args.batch_size}, "
          f"{world} x {device}")
    if args.resume:
        print(f"resuming from {args.resume} at step {step}")
    if args.start_over and os.path.exists(args.out_dir):
        aside = f"{os.path.normpath(args.out_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(args.out_dir, aside)
        print(f"--start-over: moved the old run in {args.out_dir} to {aside}")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "args.json")
    with open(path + ".tmp", "w") as f:  # whole or absent, as the checkpoints
        json.dump(vars(args), f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    if args.wandb:
        import wandb  # optional: check_run refused --wandb without it
        return wandb.init(project=args.wandb, dir=args.out_dir, config=vars(args),
                          name=os.path.basename(os.path.abspath(args.out_dir)))


def catch_interrupt(world):
    """(a list that a Ctrl-C appends to, the handler before): the loop ends the step under way,
    checkpoints it and stops; a second Ctrl-C stops at once. Under torchrun, which stops its
    ranks itself (maybe at different steps), Ctrl-C keeps its usual way."""
    stop, handler = [], signal.getsignal(signal.SIGINT)

    def interrupted(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, handler)
    if world == 1:
        signal.signal(signal.SIGINT, interrupted)
    return stop, handler
