"""Run the RadGraph model on reports, inside RadGraph's own Python environment.

This script runs in an interpreter that has ``radgraph``, ``transformers<5`` and
``dagster-pipes``, not in the kad-pipeline environment, so it imports only the standard
library, ``dagster_pipes`` and ``radgraph``. Input is JSON Lines (``report_id``, ``text``);
output is one RadGraph-format JSON object keyed by report id, written atomically.

Launched by Dagster through ``PipesSubprocessClient``, it reads its settings from the Pipes
extras (``input_path``, ``output_path``, ``model_type``, ``batch_size``) and streams logs and
progress messages back. Launched directly, it takes the same settings as options.

Exit codes: 0 done, 2 invalid input, 3 radgraph not installed, 4 model weights not available.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Python puts the script's folder first on sys.path, and that folder holds our radgraph.py,
# which would shadow the radgraph package.
_SCRIPT_FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _SCRIPT_FOLDER]

from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes  # noqa: E402

EXIT_INVALID_INPUT = 2
EXIT_MISSING_PACKAGE = 3
EXIT_MISSING_WEIGHTS = 4


class RunnerError(Exception):
    """A failure with the exit code the runner reports for it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _StderrLog:
    """Log target for direct runs, with the methods of the Pipes logger that the runner uses."""

    def info(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    warning = info
    error = info


def read_reports(path: str) -> list[dict]:
    """Read ``{"report_id", "text"}`` lines, raising RunnerError on an invalid line."""
    reports = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunnerError(f"{path}:{line_number} is not valid JSON: {error}", EXIT_INVALID_INPUT) from error
            if not isinstance(record.get("report_id"), str) or not isinstance(record.get("text"), str):
                raise RunnerError(f"{path}:{line_number} needs string report_id and text", EXIT_INVALID_INPUT)
            reports.append(record)
    return reports


def write_json_atomic(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle)
    os.replace(handle.name, path)


def load_model(model_type: str):
    """Load RadGraph, raising RunnerError when the package or its weights are missing."""
    try:
        from radgraph import RadGraph
    except ImportError as error:
        raise RunnerError(
            f"the radgraph package is not installed in {sys.executable} ({error}); "
            "install it with `pip install radgraph 'transformers<5' dagster-pipes`",
            EXIT_MISSING_PACKAGE,
        ) from error
    try:
        return RadGraph(model_type=model_type)
    except AssertionError as error:
        # radgraph 0.1.18 asserts that model_type is one of the types it knows.
        raise RunnerError(
            f"radgraph does not support model_type {model_type!r}; radgraph 0.1.18 knows radgraph, "
            "radgraph-xl, modern-radgraph-xl and echograph",
            EXIT_INVALID_INPUT,
        ) from error
    except Exception as error:
        # radgraph 0.1.18 re-raises a failed weight download as a bare Exception, so nothing
        # narrower catches it. Errors from reading a damaged cache land here too.
        raise RunnerError(
            f"RadGraph model {model_type!r} could not be loaded ({type(error).__name__}: {error}); "
            "radgraph downloads its weights from the Hugging Face Hub (StanfordAIMI/RRG_scorers) into its "
            "cache folder (~/.cache/radgraph/<version> on Linux) on first use, so run once where the Hub "
            "is reachable or copy that folder from a machine that has it",
            EXIT_MISSING_WEIGHTS,
        ) from error


def annotate(reports: list[dict], model_type: str, batch_size: int, log, report_progress) -> dict:
    """Annotate every report and return the RadGraph output keyed by report id."""
    model = load_model(model_type)
    output: dict = {}
    started = time.monotonic()
    for batch_start in range(0, len(reports), batch_size):
        batch = reports[batch_start : batch_start + batch_size]
        with_text = [report for report in batch if report["text"].strip()]
        for report in batch:
            if not report["text"].strip():
                output[report["report_id"]] = {"text": "", "entities": {}, "data_split": "inference"}
        if with_text:
            # The radgraph package keys its result by the position in the list: "0", "1", ...
            result = model([report["text"] for report in with_text])
            for position, report in enumerate(with_text):
                output[report["report_id"]] = result[str(position)]
        done = min(batch_start + batch_size, len(reports))
        report_progress({"reports_done": done, "reports_total": len(reports), "seconds": time.monotonic() - started})
        log.info(f"RadGraph annotated {done}/{len(reports)} reports")
    return output


def run(input_path: str, output_path: str, model_type: str, batch_size: int, log, report_progress) -> int:
    if batch_size < 1:
        raise RunnerError(f"batch_size must be at least 1, got {batch_size}", EXIT_INVALID_INPUT)
    reports = read_reports(input_path)
    log.info(f"RadGraph runner: {len(reports)} reports, model {model_type}, batch size {batch_size}")
    output = annotate(reports, model_type, batch_size, log, report_progress)
    write_json_atomic(output_path, output)
    entity_count = sum(len(annotation.get("entities", {})) for annotation in output.values())
    report_progress({"reports_done": len(reports), "reports_total": len(reports), "entities": entity_count})
    log.info(f"RadGraph runner wrote {entity_count} entities for {len(output)} reports")
    return 0


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run RadGraph on a JSON Lines file of reports.")
    parser.add_argument("--input", required=True, help="JSON Lines file with report_id and text per line.")
    parser.add_argument("--output", required=True, help="Output RadGraph JSON file, keyed by report id.")
    parser.add_argument("--model-type", default="radgraph-xl", help="radgraph model type, e.g. radgraph-xl.")
    parser.add_argument("--batch-size", type=int, default=16, help="Reports per model call.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            extras = pipes.extras
            try:
                return run(
                    extras["input_path"],
                    extras["output_path"],
                    extras.get("model_type", "radgraph-xl"),
                    int(extras.get("batch_size", 16)),
                    pipes.log,
                    pipes.report_custom_message,
                )
            except RunnerError as error:
                pipes.log.error(str(error))
                print(str(error), file=sys.stderr, flush=True)
                return error.exit_code

    arguments = parse_arguments(argv)
    try:
        return run(
            arguments.input, arguments.output, arguments.model_type, arguments.batch_size, _StderrLog(), lambda _: None
        )
    except RunnerError as error:
        print(str(error), file=sys.stderr, flush=True)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
