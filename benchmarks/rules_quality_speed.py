"""Quality and speed of the rules extractor on the Open-i gold standard.

Prints micro and macro F1 over 13 ChestX-ray14 findings for three systems side by side: the
scoped rules, the KAD paper's sentence rule, and negspacy's NegEx over a spaCy EntityRuler
built from the same lexicon. Uncertain labels are mapped once to negative and once to
positive. It also prints per-finding F1 and how many false negatives are "A versus B"
findings, which the rules label uncertain by design and the gold counts as present. Then it
prints reports per second on one process and through the process pool of ``kad label``, and
peak memory while ``kad label`` labels inputs of growing size.

Run from the repository root:
    .venv/bin/python benchmarks/rules_quality_speed.py
    .venv/bin/python benchmarks/rules_quality_speed.py --skip-memory --speed-copies 5
The gold file is read from ``../shared/data/openi-gold/labels_dev.csv`` or ``$KAD_SHARED_DATA``.
"""

from __future__ import annotations

import argparse
import os
import re
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kad_pipeline.extraction.cli import BatchLabeler, RulesSettings  # noqa: E402
from kad_pipeline.extraction.labels import label_matrix  # noqa: E402
from kad_pipeline.extraction.rules import ABSENT, ENTITY_SCHEMA, PRESENT, RulesExtractor  # noqa: E402
from kad_pipeline.extraction.rules_evaluation import (  # noqa: E402
    GOLD_FINDING_QUERIES,
    SCORED_FINDINGS,
    gold_queries,
    load_gold,
    predicted_findings,
    score,
)
from kad_pipeline.queries import KAD_QUERIES  # noqa: E402
from kad_pipeline.reports import openi_tarball_path, read_openi  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("KAD_SHARED_DATA", REPO.parent / "shared" / "data"))


def benchmark_queries() -> list[str]:
    queries = list(KAD_QUERIES)
    queries.extend(name for name in gold_queries() if name not in queries)
    return queries


def negspacy_entities(extractor: RulesExtractor, reports: pl.DataFrame) -> tuple[pl.DataFrame, float]:
    """Label with spaCy: sentencizer, an EntityRuler of the rules lexicon, and negspacy's NegEx."""
    import spacy
    from negspacy.negation import Negex  # noqa: F401, registers the "negex" factory
    from negspacy.termsets import termset

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    labels = {}
    patterns = []
    for tokens, term in extractor.lexicon.terms.items():
        if term.query is None:
            continue
        label = f"Q{extractor.queries.index(term.query)}"
        labels[label] = term.query
        patterns.append({"label": label, "pattern": " ".join(tokens)})
    ruler.add_patterns(patterns)
    nlp.add_pipe("negex", config={"ent_types": sorted(labels), "neg_termset": termset("en_clinical").get_patterns()})

    rows = []
    start = time.perf_counter()
    for report_id, doc in zip(reports["report_id"], nlp.pipe(reports["text"].to_list(), batch_size=256)):
        for sentence_index, sentence in enumerate(doc.sents):
            for entity in sentence.ents:
                rows.append((report_id, sentence_index, entity.start_char, entity.end_char, entity.text,
                             labels[entity.label_], ABSENT if entity._.negex else PRESENT, None, None, "negspacy", "baseline"))
    seconds = time.perf_counter() - start
    return pl.DataFrame(rows, schema=ENTITY_SCHEMA, orient="row"), seconds


_VERSUS = re.compile(r"\b(?:versus|vs)\b", re.IGNORECASE)


def versus_false_negatives(reports: pl.DataFrame, entities: pl.DataFrame, labels: pl.DataFrame,
                           gold: pl.DataFrame) -> dict[str, int]:
    """Count, per finding, gold positives labeled uncertain with "versus" or "vs" in the mention's sentence."""
    texts = dict(zip(reports["report_id"].to_list(), reports["text"].to_list()))
    uncertain = entities.filter(pl.col("category") == "OBS-U")
    joined = gold.join(labels, on="report_id", suffix="_label")
    counts = {}
    for finding in SCORED_FINDINGS:
        queries = GOLD_FINDING_QUERIES[finding]
        missed = joined.filter(
            (pl.col(finding) == 1)
            & pl.any_horizontal([pl.col(query) == -1 for query in queries])
            & ~pl.any_horizontal([pl.col(query).fill_null(0) == 1 for query in queries])
        )["report_id"].to_list()
        count = 0
        for report_id in missed:
            text = texts[report_id]
            mentions = uncertain.filter((pl.col("report_id") == report_id) & pl.col("query").is_in(queries))
            for start, end in mentions.select("char_start", "char_end").iter_rows():
                sentence_start = max(text.rfind(".", 0, start), text.rfind("\n", 0, start)) + 1
                sentence_end = min((i for i in (text.find(".", end), text.find("\n", end)) if i >= 0), default=len(text))
                if _VERSUS.search(text, sentence_start, sentence_end):
                    count += 1
                    break
        counts[finding] = count
    return counts


def quality(reports: pl.DataFrame, gold: pl.DataFrame, queries: list[str]) -> None:
    report_ids = reports["report_id"].to_list()
    results = {}
    scoped = RulesExtractor(queries, mode="scoped")
    systems = {
        "scoped": scoped.extract,
        "paper": RulesExtractor(queries, mode="paper", knowledge_base=scoped.knowledge_base).extract,
        "negspacy": lambda frame: negspacy_entities(scoped, frame)[0],
    }
    versus_counts: dict[str, int] = {}
    for name, extract in systems.items():
        entities = extract(reports)
        labels = label_matrix(entities, report_ids, queries)
        results[name] = [score(predicted_findings(labels, uncertain_as), gold) for uncertain_as in (0, 1)]
        if name == "scoped":
            versus_counts = versus_false_negatives(reports, entities, labels, gold)

    print(f"\nQuality on {gold.join(reports.select('report_id'), on='report_id').height} Open-i reports, "
          f"{len(SCORED_FINDINGS)} findings (Hernia left out: no gold positives)")
    print(f"{'system':10} {'micro-F1 U->0':>14} {'macro-F1 U->0':>14} {'micro-F1 U->1':>14} {'macro-F1 U->1':>14}")
    for name, (negative, positive) in results.items():
        print(f"{name:10} {negative.micro_f1:14.4f} {negative.macro_f1:14.4f} {positive.micro_f1:14.4f} {positive.macro_f1:14.4f}")

    print("\nPer-finding F1 (uncertain -> negative); tp/fp/fn and 'versus' false negatives of scoped")
    print(f"{'finding':20} {'support':>7} " + " ".join(f"{name:>9}" for name in results)
          + f" {'tp':>5} {'fp':>5} {'fn':>5} {'fn vs':>6}")
    tables = {name: scores[0].per_finding for name, scores in results.items()}
    for row, finding in enumerate(SCORED_FINDINGS):
        scoped_row = tables["scoped"].row(row, named=True)
        print(f"{finding:20} {scoped_row['support']:7d} " + " ".join(f"{tables[name]['f1'][row]:9.3f}" for name in results)
              + f" {scoped_row['tp']:5d} {scoped_row['fp']:5d} {scoped_row['fn']:5d} {versus_counts[finding]:6d}")
    total_fn = int(tables["scoped"]["fn"].sum())
    print(f"Of the {total_fn} false negatives of scoped, {sum(versus_counts.values())} are findings labeled uncertain "
          "after 'versus' or 'vs'.\nThe gold counts 'A versus B' as present for both; the scoped rules keep it "
          "uncertain on purpose, as a differential should be, so this gap is left as it is.")


def speed(reports: pl.DataFrame, queries: list[str], copies: int, processes: list[int], batch_size: int) -> None:
    frame = pl.concat([reports.select("report_id", "text")] * copies)
    extractor = RulesExtractor(queries)
    extractor.extract(frame.head(200))  # warm the spelling cache as a long run would
    start = time.perf_counter()
    extractor.extract(frame)
    seconds = time.perf_counter() - start
    print(f"\nSpeed: rules (scoped) on {frame.height} reports, one process: {frame.height / seconds:,.0f} reports/s")

    _, negspacy_seconds = negspacy_entities(extractor, frame.head(min(frame.height, 4000)))
    print(f"Speed: negspacy baseline, one process: {min(frame.height, 4000) / negspacy_seconds:,.0f} reports/s")

    print(f"\nSpeed: kad label's BatchLabeler (entities and label matrix), {frame.height} reports in batches of {batch_size}")
    print(f"NOTE: this machine has {os.cpu_count()} CPU cores shared with other work (load average before the runs: "
          f"{', '.join(f'{load:.1f}' for load in os.getloadavg())}), so the wall-clock rates of several processes\n"
          "show scaling only when the cores are otherwise idle. Reports per CPU-second of the labeling processes\n"
          "is the per-process speed, which does not depend on the load.")
    batches = [frame.slice(offset, batch_size) for offset in range(0, frame.height, batch_size)]
    settings = RulesSettings(tuple(queries))
    for count in processes:
        startup_cpu, _, _ = _labeling_run(settings, count, [])
        labeling_cpu, rows, (startup, wall) = _labeling_run(settings, count, batches)
        print(f"  {count} process(es): {rows / wall:,.0f} reports/s wall clock after a start-up of {startup:.1f} s; "
              f"{rows / (labeling_cpu - startup_cpu):,.0f} reports per CPU-second of the labeling processes "
              "(their start-up CPU, measured on an empty run, taken off)")


def _labeling_run(settings: RulesSettings, count: int, batches: list[pl.DataFrame]) -> tuple[float, int, tuple[float, float]]:
    """Return (CPU seconds of the labeling processes, rows, (start-up seconds, labeling seconds))."""
    before = os.times()
    start = time.perf_counter()
    labeler = BatchLabeler(settings, workers=count)
    started = time.perf_counter()
    rows = sum(labels.height for labels, _ in labeler.label(batches))
    finished = time.perf_counter()
    labeler.close()
    after = os.times()
    if count == 1:
        cpu = (after.user + after.system) - (before.user + before.system)
    else:
        cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return cpu, rows, (started - start, finished - started)


def memory(report_counts: list[int], processes: list[int]) -> None:
    """Peak resident memory of ``kad label`` on synthetic tables of growing size, per worker count."""
    sentences = [
        "No focal consolidation, pleural effusion, or pneumothorax.", "Heart size is normal.",
        "Mild bibasilar atelectasis.", "Possible small left effusion.", "Right chest tube in place.",
    ]
    print("\nMemory: peak RSS of kad label (rules) on a CSV of synthetic reports; with workers, the main process"
          "\nand the largest worker (ru_maxrss of the children, an upper bound: it can include the image they were forked from)")
    with tempfile.TemporaryDirectory() as folder:
        for count in report_counts:
            table = Path(folder) / f"reports_{count}.csv"
            pl.DataFrame({
                "report_id": [f"R{i}" for i in range(count)],
                "text": [" ".join(sentences[(i + k) % 5] for k in range(3)) for i in range(count)],
            }).write_csv(table)
            # VmHWM of /proc/self/status, because ru_maxrss after fork and exec can still
            # report the larger peak of the forked parent image on Linux.
            for workers in processes:
                code = (
                    "import resource; from kad_pipeline.cli import main; "
                    f"rc = main(['label', '--reports', {str(table)!r}, '--output', {str(table) + '.labels.csv'!r}, "
                    f"'--workers', '{workers}']); "
                    "print([int(line.split()[1]) // 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0], "
                    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)"
                )
                start = time.perf_counter()
                output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
                seconds = time.perf_counter() - start
                main_mib, child_mib = output.stdout.strip().splitlines()[-1].split()
                workers_text = f", largest worker {child_mib} MiB" if workers > 1 else ""
                print(f"  {count:>8,} reports, {workers} worker(s): peak RSS {main_mib} MiB{workers_text}, {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-copies", type=int, default=10, help="times the Open-i corpus is repeated for speed (default: 10)")
    parser.add_argument("--processes", default="1,2", help="process counts for the scaling figure (default: 1,2)")
    parser.add_argument("--batch-size", type=int, default=5000, help="reports per batch for the process pool (default: 5000)")
    parser.add_argument("--memory-counts", default="20000,200000", help="report counts for the memory figure")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory figure")
    args = parser.parse_args()

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"Command: .venv/bin/python benchmarks/rules_quality_speed.py {' '.join(sys.argv[1:])}".rstrip())
    reports = read_openi(openi_tarball_path()).reports
    queries = benchmark_queries()
    gold_path = shared_data() / "openi-gold" / "labels_dev.csv"
    if gold_path.is_file():
        gold = load_gold(gold_path)
        quality(reports.join(gold.select("report_id"), on="report_id", how="semi"), gold, queries)
    else:
        print(f"\nQuality: skipped, the gold file {gold_path} is absent")
    speed(reports, queries, args.speed_copies, [int(n) for n in args.processes.split(",")], args.batch_size)
    if not args.skip_memory:
        memory([int(n) for n in args.memory_counts.split(",")], [int(n) for n in args.processes.split(",")])


if __name__ == "__main__":
    main()
