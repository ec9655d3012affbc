"""Throughput of the LLM client, the RadGraph converter and the extractor agreement.

The LLM part runs against the scripted OpenAI-compatible server of the test suite on
127.0.0.1, so it measures our client's overhead (concurrency, cache, parsing), not a model.

Run from the repository root:
    .venv/bin/python benchmarks/extractor_throughput.py
"""

import random
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from llm_server import ChatServer  # noqa: E402

from kad_pipeline.extraction.agreement import agreement_table  # noqa: E402
from kad_pipeline.extraction.llm import LLMConfig, LLMExtractor  # noqa: E402
from kad_pipeline.extraction.radgraph import convert_radgraph  # noqa: E402
from kad_pipeline.queries import KAD_QUERIES  # noqa: E402


def bench_llm(n_reports: int = 400) -> None:
    texts = [f"Report {i}: small pleural effusion, no pneumothorax, possible edema." for i in range(n_reports)]
    reports = pl.DataFrame({"report_id": [f"r{i}" for i in range(n_reports)], "text": texts})
    with ChatServer() as server:
        for concurrency in (1, 4, 16):
            with tempfile.TemporaryDirectory() as cache:
                config = LLMConfig(
                    base_url=server.base_url, model="scripted", api_key_env="", cache_dir=cache,
                    concurrency=concurrency, requests_per_minute=None,
                )
                started = time.perf_counter()
                LLMExtractor(config).extract(reports)
                cold = time.perf_counter() - started
                started = time.perf_counter()
                again = LLMExtractor(config).extract(reports)
                warm = time.perf_counter() - started
                print(
                    f"LLM client, concurrency {concurrency}: {n_reports / cold:,.0f} reports/s uncached, "
                    f"{n_reports / warm:,.0f} reports/s from the answer cache ({again.usage.cache_hits} hits)"
                )


def bench_radgraph(rng: random.Random, n_reports: int = 5000) -> None:
    words = ["pleural", "effusion", "no", "pneumothorax", "mild", "cardiomegaly", ".", "opacities", "left", "base"]
    labels = ["OBS-DP", "OBS-DA", "ANAT-DP", "OBS-U"]
    data = {}
    for i in range(n_reports):
        tokens = [rng.choice(words) for _ in range(40)]
        entities = {
            str(j + 1): {
                "tokens": tokens[j * 2], "label": rng.choice(labels), "start_ix": j * 2, "end_ix": j * 2,
                "relations": [["located_at", str(j)]] if j else [],
            }
            for j in range(15)
        }
        data[f"r{i}"] = {"text": " ".join(tokens), "entities": entities}
    started = time.perf_counter()
    converted = convert_radgraph(data, KAD_QUERIES)
    elapsed = time.perf_counter() - started
    print(f"RadGraph conversion: {n_reports:,} reports, {converted.entities.height:,} entities in {elapsed:.2f} s")


def bench_agreement(rng: random.Random, n_reports: int = 10_000) -> None:
    ids = [f"r{i}" for i in range(n_reports)]

    def random_matrix() -> pl.DataFrame:
        columns = {q: pl.Series([rng.choice([1, 0, -1, None]) for _ in ids], dtype=pl.Int8) for q in KAD_QUERIES}
        return pl.DataFrame({"report_id": ids, **columns})

    matrices = {"rules": random_matrix(), "radgraph": random_matrix(), "llm": random_matrix()}
    gold = random_matrix()
    started = time.perf_counter()
    table, disagreements = agreement_table(matrices, KAD_QUERIES, gold=gold)
    elapsed = time.perf_counter() - started
    print(
        f"Agreement: 3 extractors plus gold, {n_reports:,} reports x {len(KAD_QUERIES)} queries: "
        f"{table.height} rows, {disagreements.height:,} disagreements in {elapsed:.2f} s"
    )


def main() -> None:
    rng = random.Random(0)
    bench_llm()
    bench_radgraph(rng)
    bench_agreement(rng)
    print("Reproduce with: .venv/bin/python benchmarks/extractor_throughput.py")


if __name__ == "__main__":
    main()
