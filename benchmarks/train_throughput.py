"""Stage-2 training throughput: images per second and peak memory for the data loader alone,
the model step alone (forward, three losses, backward, clipping, AdamW), and both together.

Each mode runs in a fresh child process so its peak memory is its own. Random weights, random
labels and random (but real, cached and augmented) images; nothing is downloaded or installed.

CPU, the configuration of the KAD paper (ResNet-50 cut after layer3, 224 px, batch 8):
    python benchmarks/train_throughput.py --backbone resnet50 --image-size 224 --batch-size 8
GPU:
    python benchmarks/train_throughput.py --device cuda --batch-size 256 --num-workers 12 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# The KAD reference code's stage-2 step (image encoder, DQN and losses, random weights, AdamW,
# no data loading) at 224 px and batch 8 on a 2-core CPU machine, measured before this project.
REFERENCE_CPU_IMAGES_PER_SECOND = (2.7, 3.4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", help="resnet18|resnet34|resnet50|resnet101|vit_b_16")
    parser.add_argument("--image-size", type=int, default=224, help="network input side in pixels")
    parser.add_argument("--cache-size", type=int, default=0, help="cached image side; 0 means image size + 32 (crop then resize)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--queries", type=int, default=41, help="number of DQN queries")
    parser.add_argument("--embed-dim", type=int, default=768, help="text width d")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA and AMX CPUs, else fp32)|fp32|bf16")
    parser.add_argument("--channels-last", default="on", choices=["on", "off"], help="NHWC activations and weights")
    parser.add_argument("--compile", default="off", choices=["off", "on"], help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps the default")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--modes", default="loader,step,both", help="comma-separated subset of loader,step,both")
    parser.add_argument("--mode", default="", help=argparse.SUPPRESS)  # a single mode, run in a child process
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_cache(directory: Path, count: int, size: int) -> None:
    import numpy as np
    import polars as pl
    from PIL import Image

    from kad_pipeline.images.cache import build_image_cache

    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        path = directory / "png" / f"img{number:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path, compress_level=1)
        paths.append(str(path))
    manifest = pl.DataFrame({"image_id": [Path(path).stem for path in paths], "path": paths})
    build_image_cache(manifest, directory / "cache", size)


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_mode(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from kad_pipeline.images.cache import ImageCache
    from kad_pipeline.models.kad import KADConfig, KADModel
    from kad_pipeline.training.distributed import DistributedContext, resolve_device
    from kad_pipeline.training.stage2 import (
        CachedImageDataset,
        ResumableBatchSampler,
        _autocast,
        compute_losses,
        resolve_precision,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    channels_last = args.channels_last == "on"
    torch.backends.cudnn.benchmark = True
    total_steps = args.warmup + args.steps
    context = DistributedContext(device=device)

    cache = ImageCache(args.cache_dir)
    dataset = CachedImageDataset(cache, np.arange(len(cache)), args.image_size, True, 0.5, False, seed=0)

    def batches():
        epoch = 0
        while True:
            sampler = ResumableBatchSampler(len(dataset), args.batch_size, 1, context, 0, epoch, 0)
            options = {"num_workers": args.num_workers, "pin_memory": device.type == "cuda"}
            if args.num_workers:
                options.update(prefetch_factor=4, persistent_workers=False)
            yield from DataLoader(dataset, batch_sampler=sampler, **options)
            epoch += 1

    if args.mode == "loader":
        iterator = batches()
        for _ in range(args.warmup):
            next(iterator)
        started = time.perf_counter()
        for _ in range(args.steps):
            pixels, _ = next(iterator)
            pixels.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        return {"mode": "loader", "images_per_second": args.batch_size * args.steps / elapsed,
                "peak_memory_mib": peak_memory_mib(device)}

    torch.manual_seed(0)
    config = KADConfig(backbone=args.backbone, image_size=args.image_size, embed_dim=args.embed_dim,
                       query_names=[f"q{i}" for i in range(args.queries)])
    model = KADModel(config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if args.compile == "on" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.embed_dim, device=device), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(64, args.embed_dim, device=device), dim=-1)
    labels = torch.randint(-1, 2, (args.batch_size, args.queries), device=device)
    text_ids = torch.randint(0, 64, (args.batch_size,), device=device)
    fixed_pixels = torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8)

    def step(pixels):
        images = model.normalize(pixels.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            losses = compute_losses(train_model, images, labels, texts[text_ids], text_ids, queries, config,
                                    "local", context)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    iterator = batches() if args.mode == "both" else None
    for index in range(total_steps):
        if index == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
        step(next(iterator)[0] if iterator is not None else fixed_pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"mode": args.mode, "images_per_second": args.batch_size * args.steps / elapsed,
            "peak_memory_mib": peak_memory_mib(device), "precision": precision, "channels_last": channels_last}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return

    import torch

    cache_size = args.cache_size or args.image_size + 32
    images_needed = max(64, args.batch_size * (args.steps + args.warmup) * 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="kad-throughput-") as scratch:
        started = time.perf_counter()
        build_cache(Path(scratch), min(images_needed, 4096), cache_size)
        print(f"built a cache of {min(images_needed, 4096)} random {cache_size} px images in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        child_argv = [arg for arg in (argv if argv is not None else sys.argv[1:])]
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, *child_argv, "--mode", mode, "--cache-dir", str(Path(scratch) / "cache")]
            output = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
            if output.returncode != 0:
                print(f"mode {mode} failed:\n{output.stderr[-3000:]}")
                continue
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else f"cpu: {os.cpu_count()} cores"
    print(f"\nstage-2 throughput, {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.queries} queries, d={args.embed_dim}, {args.steps} timed steps, {device}, torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}, workers {args.num_workers}, compile {args.compile}")
    print(f"{'mode':<8} {'images/s':>10} {'peak MiB':>10}  notes")
    for result in results:
        notes = f"precision {result['precision']}, channels_last {result['channels_last']}" if "precision" in result else ""
        print(f"{result['mode']:<8} {result['images_per_second']:>10.2f} {result['peak_memory_mib']:>10.0f}  {notes}")
    step = next((result for result in results if result["mode"] == "step"), None)
    if step and args.device != "cuda" and args.image_size == 224 and args.batch_size == 8 and args.backbone == "resnet50":
        low, high = REFERENCE_CPU_IMAGES_PER_SECOND
        print(f"model step vs the KAD reference step ({low}-{high} images/s on 2 CPU cores): "
              f"{step['images_per_second'] / high:.2f}x to {step['images_per_second'] / low:.2f}x "
              f"(target: at least 1.5x)")
    print("reproduce: python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
