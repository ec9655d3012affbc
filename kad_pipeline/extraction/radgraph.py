"""RadGraph annotations (published JSON or the `radgraph` package's output) as our entity table.

RadGraph output is a JSON object keyed by report id. Each value has ``text`` (the report as
whitespace-separated tokens) and ``entities``: entity id to ``tokens``, ``label``, ``start_ix``,
``end_ix`` (inclusive token indices into ``text``) and ``relations`` (``[relation, target id]``
pairs, relations ``modify``, ``located_at`` and ``suggestive_of``).

The `radgraph` package needs ``transformers<5``, so it runs in its own Python environment:
:func:`run_radgraph` launches ``radgraph_runner.py`` there and reads what it writes.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from kad_pipeline.extraction.schema import ENTITY_SCHEMA
from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

EXTRACTOR_NAME = "radgraph"
CONVERTER_VERSION = "radgraph-json-1"

RUNNER_PATH = Path(__file__).with_name("radgraph_runner.py")

INSTALL_HINT = (
    "Create a separate environment for RadGraph, because it needs transformers<5 and kad-pipeline "
    "uses transformers 5: "
    "`python -m venv .venv-radgraph && .venv-radgraph/bin/pip install radgraph 'transformers<5' "
    "dagster-pipes`, then set RadGraphResource.python_executable to "
    ".venv-radgraph/bin/python. radgraph downloads its weights from the Hugging Face Hub on first use "
    "into ~/.cache/radgraph (on Linux), so run it once where the Hub is reachable or copy that folder, "
    "or pass the published RadGraph JSON with radgraph_json instead."
)

# Original RadGraph labels, and the RadGraph-XL spellings (`<entity type>::<certainty>`).
# NOTE: our entity table has a single anatomy category, so the rare RadGraph-XL anatomy labels
# with another certainty than "definitely present" are stored as ANAT-DP too.
_CATEGORY_BY_LABEL: dict[str, str] = {
    "anat-dp": "ANAT-DP",
    "obs-dp": "OBS-DP",
    "obs-u": "OBS-U",
    "obs-da": "OBS-DA",
    "anatomy::definitely present": "ANAT-DP",
    "anatomy::uncertain": "ANAT-DP",
    "anatomy::definitely absent": "ANAT-DP",
    "observation::definitely present": "OBS-DP",
    "observation::uncertain": "OBS-U",
    "observation::definitely absent": "OBS-DA",
}

REJECT_SCHEMA: dict[str, pl.DataType] = {
    "report_id": pl.String(),
    "entity_id": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
}


class RadGraphFormatError(ValueError):
    """The RadGraph JSON does not have the published structure."""


class RadGraphUnavailableError(RuntimeError):
    """The RadGraph environment or its model weights are missing."""


def category_of_label(label: str) -> str | None:
    """Return our category for a RadGraph or RadGraph-XL label, or None for an unknown label."""
    return _CATEGORY_BY_LABEL.get(" ".join(label.strip().lower().split()))


# --------------------------------------------------------------------------------------------
# Normalization of observations to query entities
# --------------------------------------------------------------------------------------------

# Word forms that suffix rules cannot reach, mapped to the word used in the query vocabulary.
# Query words are KAD's, some of which are stems ("thicken", "hyperinflate", "blunt").
_WORD_FORMS: dict[str, str] = {
    "pneumothoraces": "pneumothorax",
    "pneumothoraxes": "pneumothorax",
    "effusions": "effusion",
    "atelectases": "atelectasis",
    "atelectatic": "atelectasis",
    "edematous": "edema",
    "oedema": "edema",
    "emphysematous": "emphysema",
    "consolidated": "consolidation",
    "consolidative": "consolidation",
    "opacification": "opacity",
    "opacified": "opacity",
    "opacities": "opacity",
    "infiltrate": "infiltration",
    "infiltrates": "infiltration",
    "infiltrative": "infiltration",
    "calcified": "calcification",
    "calcific": "calcification",
    "engorged": "engorgement",
    "hyperinflation": "hyperinflate",
    "hyperexpanded": "hyperinflate",
    "hyperexpansion": "hyperinflate",
    "aeration": "aerate",
    "obscuration": "obscure",
    "dilatation": "dilation",
    "dilated": "dilation",
    "distension": "distention",
    "distended": "distention",
    "herniation": "hernia",
    "herniated": "hernia",
    "deformed": "deformity",
    "aspirated": "aspiration",
    "drain": "drainage",
    "drains": "drainage",
    "pacer": "pacemaker",
    "nodular": "nodule",
    "enlargement": "enlarged",
    "widened": "enlarged",
    "widening": "enlarged",
    "pleura": "pleural",
    "mediastinum": "cardiomediastinum",
    "mediastinal": "cardiomediastinum",
    "cardiomediastinal": "cardiomediastinum",
}

# Observation word plus anatomy word that name a query no word of it contains.
_COMBINED_FORMS: dict[tuple[str, str], str] = {
    ("enlarged", "heart"): "cardiomegaly",
    ("enlarged", "cardiac"): "cardiomegaly",
}

# Queries left to the label matrix, which derives "normal" from the other queries.
_UNMATCHED_QUERIES = frozenset({"normal"})

_WORD_RE = re.compile(r"[a-z]+")


def normalize_word(word: str, vocabulary: frozenset[str] = frozenset()) -> str:
    """Map a plural or inflected word to its form in ``vocabulary`` (query words).

    Irregular and derived forms come from a table, then plural suffixes are removed, then
    ``-ed``/``-ing`` are removed when the stem (with a final "e" restored, or a doubled final
    consonant undone) is a vocabulary word. A word that matches nothing is returned lower-cased.
    """
    word = word.lower()
    if word in vocabulary:
        return word
    if word in _WORD_FORMS:
        return _WORD_FORMS[word]

    singular = word
    if len(word) > 4 and word.endswith("ies"):
        singular = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes")):
        singular = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "is", "us")):
        singular = word[:-1]
    if singular in vocabulary or singular in _WORD_FORMS:
        return _WORD_FORMS.get(singular, singular)

    for suffix in ("ing", "ed"):
        if singular.endswith(suffix) and len(singular) > len(suffix) + 2:
            stem = singular[: -len(suffix)]
            candidates = [stem, stem + "e"]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                candidates.append(stem[:-1])
            for candidate in candidates:
                if candidate in vocabulary:
                    return candidate
    return singular


class QueryMatcher:
    """Matches an observation, with the anatomy it is located at, to one query entity."""

    def __init__(self, queries: Sequence[str]) -> None:
        self.queries = tuple(queries)
        self.vocabulary = frozenset(word for query in self.queries for word in _WORD_RE.findall(query.lower()))
        # Longer queries first, so "pleural effusion" wins over a single-word query.
        ordered = sorted(
            (query for query in self.queries if query not in _UNMATCHED_QUERIES),
            key=lambda query: (-len(query.split()), self.queries.index(query)),
        )
        self._ordered = tuple((query, tuple(self.words_of(query))) for query in ordered)

    def words_of(self, text: str) -> list[str]:
        return [normalize_word(word, self.vocabulary) for word in _WORD_RE.findall(text.lower())]

    def match(self, observation: str, anatomy: Iterable[str] = ()) -> str | None:
        """Return the query named by ``observation`` located at ``anatomy``, or None."""
        observation_words = set(self.words_of(observation))
        anatomy_words = {word for phrase in anatomy for word in self.words_of(phrase)}

        # In chest radiograph reports a bare "effusion" is a pleural effusion; one located at
        # other anatomy (pericardial) is not.
        if "effusion" in observation_words and not anatomy_words:
            anatomy_words.add("pleural")

        all_words = observation_words | anatomy_words
        for query, query_words in self._ordered:
            if not query_words:
                continue
            if all(word in all_words for word in query_words) and any(
                word in observation_words for word in query_words
            ):
                return query
        for (observation_word, anatomy_word), query in _COMBINED_FORMS.items():
            if query in self.queries and observation_word in observation_words and anatomy_word in all_words:
                return query
        return None


# --------------------------------------------------------------------------------------------
# Offsets
# --------------------------------------------------------------------------------------------

_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)\s*|\n+")


def sentence_starts(text: str) -> list[int]:
    """Return the character offset where each sentence of ``text`` starts (period or newline ends one)."""
    starts = [0]
    for match in _SENTENCE_END_RE.finditer(text):
        if match.end() < len(text):
            starts.append(match.end())
    return starts


def align_tokens(tokens: Sequence[str], text: str) -> list[tuple[int, int]]:
    """Find each token in ``text`` left to right; a token that is not found gets ``(-1, -1)``.

    RadGraph re-tokenizes the report (punctuation split off, spaces normalized), so its tokens
    are searched for in order instead of being counted.
    """
    spans: list[tuple[int, int]] = []
    lowered = text.lower()
    position = 0
    for token in tokens:
        start = text.find(token, position)
        if start < 0:
            start = lowered.find(token.lower(), position)
        if start < 0:
            spans.append((-1, -1))
            continue
        end = start + len(token)
        spans.append((start, end))
        position = end
    return spans


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadGraphEntities:
    """Entity table converted from RadGraph output, and the entities that could not be converted."""

    entities: pl.DataFrame
    rejects: pl.DataFrame


_MIMIC_KEY_RE = re.compile(r"(?:^|/)(s\d+)\.txt$")


def report_id_of_key(key: str) -> str:
    """Map a RadGraph JSON key to our report id.

    Published MIMIC-CXR keys are report paths such as ``p10/p10000032/s50414267.txt``; our
    MIMIC-CXR report id is the study id with its "s" prefix (``s50414267``). Other keys are
    used unchanged.
    """
    match = _MIMIC_KEY_RE.search(key)
    return match.group(1) if match else key


def load_radgraph_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a RadGraph JSON file, raising :class:`RadGraphFormatError` when it is not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RadGraph JSON not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RadGraphFormatError(f"RadGraph JSON {path} is not valid UTF-8 JSON: {error}") from error
    if not isinstance(data, dict):
        raise RadGraphFormatError(
            f"RadGraph JSON {path} must be an object keyed by report id, got {type(data).__name__}"
        )
    return data


def convert_radgraph(
    data: Mapping[str, Any],
    queries: Sequence[str] = KAD_QUERIES,
    reports: pl.DataFrame | None = None,
    key_to_report_id: Callable[[str], str] | None = None,
    extractor_version: str = CONVERTER_VERSION,
) -> RadGraphEntities:
    """Convert RadGraph output to the entity table, with a reject row for each unusable entity.

    With ``reports`` (columns report_id, text) the offsets point into the reports' ``text`` and
    keys that are not in ``reports`` are rejected. Without it they point into RadGraph's own
    ``text``. ``key_to_report_id`` maps JSON keys to report ids (default: :func:`report_id_of_key`).
    Offsets of a token that cannot be found in the text are -1.
    """
    matcher = QueryMatcher(tuple(queries))
    texts: dict[str, str] | None = None
    if reports is not None:
        missing = {"report_id", "text"} - set(reports.columns)
        if missing:
            raise ValueError(f"reports table lacks columns {sorted(missing)}; it needs report_id and text")
        texts = dict(zip(reports["report_id"].to_list(), reports["text"].to_list(), strict=True))

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for key, annotation in data.items():
        report_id = (key_to_report_id or report_id_of_key)(key)
        if not isinstance(annotation, Mapping) or not isinstance(annotation.get("text"), str):
            rejects.append(_reject(report_id, None, "malformed-report", "expected an object with a 'text' string"))
            continue
        entities = annotation.get("entities", {})
        if not isinstance(entities, Mapping):
            rejects.append(_reject(report_id, None, "malformed-report", "'entities' is not an object"))
            continue
        if texts is not None and report_id not in texts:
            rejects.append(_reject(report_id, None, "unknown-report-id", "report id not in the reports table"))
            continue
        target_text = texts[report_id] if texts is not None else annotation["text"]
        rows.extend(
            _convert_report(report_id, annotation["text"], entities, target_text, matcher, extractor_version, rejects)
        )

    entities_df = pl.DataFrame(rows, schema=ENTITY_SCHEMA)
    rejects_df = pl.DataFrame(rejects, schema=REJECT_SCHEMA)
    logger.info(
        "converted RadGraph output: %d reports, %d entities, %d rejected",
        len(data),
        entities_df.height,
        rejects_df.height,
    )
    if rejects_df.height:
        logger.warning("RadGraph rejects by reason: %s", dict(rejects_df["reason"].value_counts().iter_rows()))
    return RadGraphEntities(entities=entities_df, rejects=rejects_df)


def _reject(report_id: str, entity_id: str | None, reason: str, detail: str) -> dict[str, Any]:
    return {"report_id": report_id, "entity_id": entity_id, "reason": reason, "detail": detail}


def _convert_report(
    report_id: str,
    radgraph_text: str,
    entities: Mapping[str, Any],
    target_text: str,
    matcher: QueryMatcher,
    extractor_version: str,
    rejects: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    tokens = radgraph_text.split()
    token_spans = align_tokens(tokens, target_text)
    starts = sentence_starts(target_text)

    # First pass: validate every entity, so relations can refer to entities defined later.
    valid: dict[str, dict[str, Any]] = {}
    for entity_id, entity in entities.items():
        if not isinstance(entity, Mapping):
            rejects.append(_reject(report_id, entity_id, "malformed-entity", "entity is not an object"))
            continue
        label = entity.get("label")
        category = category_of_label(label) if isinstance(label, str) else None
        if category is None:
            rejects.append(_reject(report_id, entity_id, "unknown-label", f"label {label!r}"))
            continue
        start_ix, end_ix = entity.get("start_ix"), entity.get("end_ix")
        if not (isinstance(start_ix, int) and isinstance(end_ix, int) and 0 <= start_ix <= end_ix < len(tokens)):
            rejects.append(
                _reject(
                    report_id,
                    entity_id,
                    "invalid-token-span",
                    f"start_ix={start_ix!r} end_ix={end_ix!r} for a text of {len(tokens)} tokens",
                )
            )
            continue
        surface = entity.get("tokens")
        if not isinstance(surface, str) or not surface.strip():
            surface = " ".join(tokens[start_ix : end_ix + 1])
        valid[str(entity_id)] = {"category": category, "start_ix": start_ix, "end_ix": end_ix, "surface": surface}

    # Anatomy each observation is located at, following located_at relations to anatomy entities.
    anatomy_of: dict[str, list[str]] = {entity_id: [] for entity_id in valid}
    for entity_id, entity in entities.items():
        entity_id = str(entity_id)
        if entity_id not in valid:
            continue
        for relation in entity.get("relations") or []:
            if not (isinstance(relation, Sequence) and len(relation) == 2):
                rejects.append(_reject(report_id, entity_id, "malformed-relation", f"relation {relation!r}"))
                continue
            relation_type, target = str(relation[0]).strip().lower(), str(relation[1])
            if relation_type != "located_at":
                continue
            if target not in valid:
                rejects.append(_reject(report_id, entity_id, "dangling-relation", f"located_at target {target!r}"))
                continue
            if valid[target]["category"] == "ANAT-DP":
                anatomy_of[entity_id].append(valid[target]["surface"])

    rows = []
    for entity_id, entity in valid.items():
        spans = [span for span in token_spans[entity["start_ix"] : entity["end_ix"] + 1] if span[0] >= 0]
        char_start = spans[0][0] if spans else -1
        char_end = spans[-1][1] if spans else -1
        sentence_index = bisect.bisect_right(starts, char_start) - 1 if char_start >= 0 else -1
        query = None
        if entity["category"] != "ANAT-DP":
            query = matcher.match(entity["surface"], anatomy_of[entity_id])
        rows.append(
            {
                "report_id": report_id,
                "sentence_index": sentence_index,
                "char_start": char_start,
                "char_end": char_end,
                "entity": entity["surface"],
                "query": query,
                "category": entity["category"],
                "cui": None,
                "semantic_type": None,
                "extractor": EXTRACTOR_NAME,
                "extractor_version": extractor_version,
            }
        )
    return rows


def entities_from_radgraph_json(
    path: str | os.PathLike,
    queries: Sequence[str] = KAD_QUERIES,
    reports: pl.DataFrame | None = None,
    key_to_report_id: Callable[[str], str] | None = None,
) -> pl.DataFrame:
    """Read a RadGraph JSON file into the entity table; rejected entities are logged by reason.

    Use :func:`convert_radgraph` with :func:`load_radgraph_json` to get the reject rows as well.
    """
    return convert_radgraph(load_radgraph_json(path), queries, reports, key_to_report_id).entities


# --------------------------------------------------------------------------------------------
# Running RadGraph in its own environment
# --------------------------------------------------------------------------------------------


def check_radgraph_environment(
    python_executable: str, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Check that ``python_executable`` can import radgraph and dagster_pipes; return their versions.

    Raises :class:`RadGraphUnavailableError` with installation steps when it cannot.
    """
    executable = Path(python_executable)
    if not executable.exists():
        raise RadGraphUnavailableError(f"RadGraph Python executable not found: {python_executable}. {INSTALL_HINT}")
    probe = (
        "import json, importlib.metadata as metadata\n"
        "import radgraph, transformers, dagster_pipes\n"
        "try:\n"
        "    version = metadata.version('radgraph')\n"
        "except metadata.PackageNotFoundError:\n"
        "    version = getattr(radgraph, '__version__', 'unknown')\n"
        "print(json.dumps({'radgraph': version, 'transformers': transformers.__version__}))\n"
    )
    try:
        completed = subprocess.run(
            [str(executable), "-c", probe], capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RadGraphUnavailableError(f"could not start {python_executable}: {error}. {INSTALL_HINT}") from error
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RadGraphUnavailableError(
            f"{python_executable} cannot import radgraph and dagster_pipes ({last_line}). {INSTALL_HINT}"
        )
    versions = json.loads(completed.stdout.strip().splitlines()[-1])
    major = versions["transformers"].split(".")[0]
    if major.isdigit() and int(major) >= 5:
        raise RadGraphUnavailableError(
            f"{python_executable} has transformers {versions['transformers']}, but radgraph needs "
            f"transformers<5. {INSTALL_HINT}"
        )
    return versions


def write_runner_input(reports: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write report ids and texts as JSON Lines for the runner, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as handle:
        for report_id, text in reports.select("report_id", "text").iter_rows():
            handle.write(json.dumps({"report_id": report_id, "text": text}) + "\n")
    os.replace(handle.name, path)
    return path


def runner_command(python_executable: str) -> list[str]:
    """Return the command that starts the RadGraph runner in the RadGraph environment.

    The runner file is passed by path, so the RadGraph environment does not need kad-pipeline.
    """
    return [python_executable, str(RUNNER_PATH)]


def runner_cli_arguments(input_path: Path, output_path: Path, model_type: str, batch_size: int) -> list[str]:
    """Return the runner's command line arguments for a run without Dagster Pipes."""
    return [
        "--input",
        str(input_path),
        "--output",
        str(output_path),
        "--model-type",
        model_type,
        "--batch-size",
        str(batch_size),
    ]


def run_radgraph(
    reports: pl.DataFrame,
    python_executable: str,
    model_type: str = "radgraph-xl",
    work_dir: str | os.PathLike | None = None,
    queries: Sequence[str] = KAD_QUERIES,
    batch_size: int = 16,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> RadGraphEntities:
    """Run RadGraph on ``reports`` in its own interpreter without Dagster, and convert its output.

    Dagster assets launch the same runner through ``PipesSubprocessClient`` instead, to stream
    its logs and counts into the run. Raises :class:`RadGraphUnavailableError` when the
    environment or the weights are missing. ``env`` replaces the child's environment variables.
    """
    check_radgraph_environment(python_executable, env=env)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="radgraph-") as folder:
        input_path = write_runner_input(reports, Path(folder) / "reports.jsonl")
        output_path = Path(folder) / "radgraph.json"
        command = runner_command(python_executable) + runner_cli_arguments(
            input_path, output_path, model_type, batch_size
        )
        logger.info("starting RadGraph runner on %d reports with model %s", reports.height, model_type)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=env)
        if completed.returncode != 0:
            raise_for_runner_failure(completed.returncode, completed.stderr)
        return convert_radgraph(load_radgraph_json(output_path), queries, reports)


# Exit codes of radgraph_runner.py, kept in step with the constants there.
RUNNER_EXIT_MISSING_PACKAGE = 3
RUNNER_EXIT_MISSING_WEIGHTS = 4


def raise_for_runner_failure(returncode: int, stderr: str = "") -> None:
    """Raise the error that matches a failed runner's exit code."""
    last_line = (stderr.strip().splitlines() or ["no error output"])[-1]
    if returncode in (RUNNER_EXIT_MISSING_PACKAGE, RUNNER_EXIT_MISSING_WEIGHTS):
        raise RadGraphUnavailableError(f"RadGraph runner failed: {last_line}. {INSTALL_HINT}")
    raise RuntimeError(f"RadGraph runner exited with code {returncode}: {last_line}")

