"""Presence cues of the scoped rules: negation, uncertainty, resolution, scope terminators.

Cues are data, matched as token sequences (lower case, hyphens dropped) outside mentions.
The cue lists are our own, written from radiology reporting usage in the spirit of NegEx
(Chapman et al., J Biomed Inform 2001): pre-cues open a scope that runs forward, post-cues
reach back to earlier mentions of the same clause.
"""

from __future__ import annotations

PRE_NEGATION = "pre-negation"
POST_NEGATION = "post-negation"
PRE_UNCERTAIN = "pre-uncertain"
POST_UNCERTAIN = "post-uncertain"
BOTH_UNCERTAIN = "both-uncertain"
PRE_HISTORICAL = "pre-historical"
SENTENCE_UNCERTAIN = "sentence-uncertain"
PSEUDO = "pseudo"
TERMINATOR = "terminator"

_CUES: dict[str, tuple[str, ...]] = {
    PRE_NEGATION: (
        "no", "not", "without", "negative for", "free of", "clear of", "absence of",
        "absent", "no evidence of", "no signs of", "no sign of", "no findings of",
        "no radiographic evidence of", "neither", "nor", "never", "none", "rather than",
        "resolution of", "resolved", "interval resolution of", "removal of",
        "interval removal of", "no longer", "no further", "ruled out", "rules out",
        "negative", "has not", "have not", "did not", "does not", "cannot see",
    ),
    # A finding of the patient's past does not describe the current image. The entity
    # categories have no "historical" value, so such a mention is recorded as absent, like a
    # resolved finding. "Previous" reaches only the next few words (see SCOPE_WORDS_OF), and
    # "consistent with history of X" (the current image shows X) is a pseudo-cue below.
    PRE_HISTORICAL: (
        "history of", "h/o", "hx of", "past history of", "prior history of",
        "remote history of", "previous history of", "previous",
    ),
    # A conditional clause hedges every finding after it in its sentence, across the
    # clause boundaries that end other scopes: "In the appropriate clinical setting, this
    # is compatible with pneumonia."
    SENTENCE_UNCERTAIN: (
        "in the appropriate clinical setting", "in the proper clinical setting",
        "in the correct clinical setting", "in the right clinical setting",
        "in the appropriate clinical context", "in the proper clinical context",
        # A differential list hedges every item, also after words such as "small" that
        # start a new clause elsewhere: "differential diagnosis includes atelectasis, small
        # infiltrate, scarring".
        "differential includes", "differential diagnosis includes", "differential diagnosis include",
        "differential diagnoses include", "differential considerations include",
        "differential considerations would include", "diagnostic considerations include",
        "diagnostic considerations would include", "differential diagnosis would include",
    ),
    POST_NEGATION: (
        "is not seen", "are not seen", "not seen", "not identified", "not visualized",
        "not present", "not appreciated", "not evident", "not demonstrated", "not noted",
        "is absent", "are absent", "absent", "has resolved", "have resolved", "resolved",
        "has cleared", "have cleared", "cleared", "no longer seen", "no longer visualized",
        "no longer present", "no longer identified", "has been removed", "have been removed",
        "removed", ": none", ": no", ": negative", ": absent", "is negative", "are negative",
        "ruled out",
        "not detected", "is not present", "are not present", "not visible",
        # "Not definitely seen" reports that the finding is not seen, as "no definite X" does.
        "not definitely seen", "not definitely identified", "not definitely visualized",
        "not clearly seen", "not clearly identified",
    ),
    # Hedges of high probability ("probably", "likely", "favored", "presumed", "consistent
    # with") are not cues: the radiologist commits to the finding, so it counts as present.
    PRE_UNCERTAIN: (
        "possible", "possibly", "questionable", "question of", "suspicious for",
        "suspicion of", "suspected", "suspect", "suggestive of", "suggesting", "suggests",
        "suggest", "may represent", "may be", "might be", "might represent", "could represent",
        "could be", "can be", "may reflect", "may indicate", "may relate to", "concerning for",
        "concern for", "cannot exclude", "can not exclude", "cannot rule out",
        "can not rule out", "differential diagnosis", "differential considerations", "differential", "maybe", "perhaps",
        "consider", "considered", "equivocal", "indeterminate", "rule out",
        "evaluate for", "r/o", "vs", "versus", "or possibly", "consistent with possible",
        "worrisome for", "raises the possibility of", "difficult to exclude", "not excluded",
        "questioned", "uncertain", "may", "could", "evaluation for", "unlikely", "less likely",
        "correlate clinically for", "correlate for", "clinical correlation for",
        # A recommendation to exclude a finding does not report it: "followup to exclude an
        # underlying mass".
        "exclude", "to exclude", "does not exclude", "do not exclude",
        # Reports use "question" alone as a hedge: "question small bilateral pleural effusions".
        "question",
        # Open-i de-identification often replaced "likely" with XXXX: "less XXXX fibrosis".
        "less XXXX",
    ),
    POST_UNCERTAIN: (
        "cannot be excluded", "can not be excluded", "cannot be ruled out",
        "can not be ruled out", "not excluded", "not ruled out", "is not excluded",
        "are not excluded", "is possible", "is suspected", "are suspected", "is questioned",
        "not entirely excluded", "could not be excluded", "is not ruled out",
        "difficult to exclude", "difficult to entirely exclude", "not entirely excluded",
        "is unlikely", "are unlikely", "less likely", "less XXXX", "?",
        "is a possibility", "are a possibility", "a possibility", "are possible",
        "is also possible", "are also possible", "also possible",
    ),
    BOTH_UNCERTAIN: ("versus", "vs"),
    PSEUDO: (
        "no change", "no significant change", "no interval change", "no change in",
        "not changed", "without change", "no increase", "no increase in", "no decrease",
        "no substantial change", "not significantly changed", "no appreciable change",
        "without interval change", "no significant interval change", "not only",
        "to suggest", "to suggest the presence of", "gram negative", "no new change",
        "not been changed", "has not changed", "have not changed", "without significant change",
        "without appreciable change", "no definite change",
        # High-probability forms of uncertainty cues: "most suggestive of edema" commits.
        "most suggestive of", "most consistent with", "most compatible with",
        "strongly suggestive of", "highly suggestive of", "very suggestive of",
        # The current image shows the finding that the history explains.
        "consistent with history of", "compatible with history of", "consistent with the history of",
        "compatible with the history of", "consistent with patient's history of",
        "consistent with the patient's history of", "compatible with the patient's history of",
        "in keeping with history of", "in keeping with the history of",
        # "Previous" names a comparison study, not a finding of the past.
        "previous exam", "previous examination", "previous study", "previous studies",
        "previous film", "previous films", "previous radiograph", "previous radiographs",
        "previous ct", "previous chest", "previous x ray", "previous images", "previous outside",
    ),
    TERMINATOR: (
        "but", "however", "although", "though", "except", "aside from", "apart from",
        "other than", "with the exception of", "which", "whereas", "while", "yet",
        "otherwise", "there", "instead", "though there", "and there",
        "this", "these", "represents", "representing",
    ),
}

# "versus" and "vs" are uncertain in both directions, so they are matched as BOTH_UNCERTAIN
# and removed from the pre-cue table above.
for _kind in (PRE_UNCERTAIN,):
    _CUES[_kind] = tuple(cue for cue in _CUES[_kind] if cue not in _CUES[BOTH_UNCERTAIN])


def cue_table(tokenize) -> dict[tuple[str, ...], str]:
    """Return token tuple -> cue kind, with ``tokenize`` the engine's tokenizer.

    On a clash the first kind in this order wins: pseudo, sentence-uncertain, both-uncertain,
    post-uncertain, pre-uncertain, post-negation, pre-negation, pre-historical, terminator.
    """
    table: dict[tuple[str, ...], str] = {}
    order = (PSEUDO, SENTENCE_UNCERTAIN, BOTH_UNCERTAIN, POST_UNCERTAIN, PRE_UNCERTAIN, POST_NEGATION,
             PRE_NEGATION, PRE_HISTORICAL, TERMINATOR)
    for kind in order:
        for cue in _CUES[kind]:
            table.setdefault(tokenize(cue), kind)
    return table


# Cue words that follow their finding as often as they precede it ("effusion resolved",
# "resolved effusion", "effusions suspected"). They reach forward when a mention starts
# within the next two words ("questionable interstitial edema"), else back to the mentions
# before them in the clause, and forward when there are none.
BIDIRECTIONAL: frozenset[tuple[str, ...]] = frozenset({
    ("none",), ("absent",), ("negative",), ("resolved",), ("removed",), ("cleared",),
    ("suspected",), ("questioned",), ("questionable",), ("equivocal",),
})

# Words that end a noun-phrase list, so a negation scope closes after them once it has
# reached a mention: "no definite pleural effusion seen, left hilar calcifications".
SCOPE_CLOSERS: frozenset[str] = frozenset({
    "seen", "identified", "noted", "present", "demonstrated", "visualized", "appreciated",
    "evident", "detected", "observed",
})

# Words that may stand between a comma and the next mention while a negation scope stays
# open, as in "no focal consolidation, large pleural effusion, or pneumothorax".
LIST_CONTINUATION: frozenset[str] = frozenset({
    "or", "and", "nor", "focal", "large", "small", "moderate", "mild", "significant", "definite",
    "acute", "new", "left", "right", "bilateral", "visible", "displaced", "overt", "frank",
    "obvious", "sizable", "appreciable", "pleural", "apical", "basilar", "lobar", "segmental",
    "confluent", "airspace", "air", "space", "any", "evident", "pulmonary", "residual", "gross",
    "discrete", "suspicious", "pathologic", "pathological", "definitive", "convincing",
    "active", "areas", "area", "of", "recurrent", "additional", "other", "evidence", "signs",
    "sign", "findings", "typical", "for", "a", "an", "large", "sizeable", "measurable",
    "interstitial", "alveolar", "parenchymal", "lung", "lungs", "bony", "osseous", "rib",
    "mediastinal", "hilar", "vascular", "cardiac", "heart", "significant", "notable",
    "volume", "increased", "abnormal", "central", "peripheral", "upper", "lower", "lobe",
    "middle", "retrocardiac", "perihilar", "bibasilar", "unilateral", "layering",
    "loculated", "associated", "underlying", "developing", "early", "worsening", "diffuse",
    "patchy", "subsegmental", "vascular", "fluid", "edge", "free", "the",
})

# Words that start a new clause after a comma and so close a negation scope, as in
# "no pneumothorax, the heart is enlarged".
CLAUSE_STARTERS: frozenset[str] = frozenset({
    "the", "there", "this", "these", "that", "those", "it", "its", "is", "are", "was", "were",
    "has", "have", "had", "which", "with", "heart", "lungs", "lung", "stable", "unchanged",
    "increased", "decreased", "mild", "moderate", "severe", "minimal", "small", "trace",
    "now", "new", "persistent", "improved", "improving", "worsening", "worsened",
    "likely", "probably", "possibly", "may", "could", "in", "at", "on", "status",
})

# Scope length of a cue in words, counted from the cue or from the last mention it reached.
SCOPE_WORDS = 8
# Cues whose scope differs from SCOPE_WORDS. "Previous" reaches only a few words, so it makes
# "previous right lower lobe pneumonia" historical but not "previous exam shows new effusion".
# A modal verb hedges its whole clause: "there may be some chronic indolent infection here
# associated with some chronic consolidation".
SCOPE_WORDS_OF: dict[tuple[str, ...], int] = {
    ("previous",): 4,
    ("may",): 14, ("may", "be"): 14, ("could",): 14, ("could", "be"): 14,
}

# Hard clause boundaries inside a sentence.
BOUNDARY_TOKENS: frozenset[str] = frozenset({";", ":", "(", ")", "[", "]"})
SENTENCE_END_TOKENS: frozenset[str] = frozenset({".", "!", "\n"})

# Heart and mediastinum statements such as "heart size is normal" or "the heart is enlarged":
# anatomy -> (query made present by an enlarged state, queries made absent by a normal state).
ANATOMY_STATEMENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "heart": ("cardiomegaly", ("cardiomegaly",)),
    "heart size": ("cardiomegaly", ("cardiomegaly",)),
    "cardiac size": ("cardiomegaly", ("cardiomegaly",)),
    "size of the heart": ("cardiomegaly", ("cardiomegaly",)),
    # The cardiac silhouette includes the pericardium, so its enlargement alone does not
    # tell cardiomegaly from a pericardial effusion. It counts as an enlarged
    # cardiomediastinum, and a normal silhouette rules out cardiomegaly.
    "cardiac silhouette": ("enlarged cardiomediastinum", ("cardiomegaly",)),
    "cardiac silhouette size": ("cardiomegaly", ("cardiomegaly",)),
    "cardiac contour": ("enlarged cardiomediastinum", ("cardiomegaly",)),
    "cardiac shadow": ("enlarged cardiomediastinum", ("cardiomegaly",)),
    "heart shadow": ("enlarged cardiomediastinum", ("cardiomegaly",)),
    "cardiopericardial silhouette": ("enlarged cardiomediastinum", ("cardiomegaly",)),
    "cardiomediastinal silhouette": ("enlarged cardiomediastinum", ("cardiomegaly", "enlarged cardiomediastinum")),
    "cardiomediastinal contour": ("enlarged cardiomediastinum", ("cardiomegaly", "enlarged cardiomediastinum")),
    "cardiomediastinal silhouettes": ("enlarged cardiomediastinum", ("cardiomegaly", "enlarged cardiomediastinum")),
    "cardiomediastinal contours": ("enlarged cardiomediastinum", ("cardiomegaly", "enlarged cardiomediastinum")),
    "heart and mediastinum": ("cardiomegaly", ("cardiomegaly", "enlarged cardiomediastinum")),
    "mediastinum": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "mediastinal contour": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "mediastinal contours": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "mediastinal silhouette": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "mediastinal width": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "mediastinal and hilar contours": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
}

ENLARGED = "enlarged"
NORMAL = "normal"
BORDERLINE = "borderline"

# State words of those statements. Uncertain states are listed so that their longer match
# wins over "normal" inside "upper limits of normal".
ANATOMY_STATES: dict[str, str] = {
    "enlarged": ENLARGED, "enlargement": ENLARGED, "large": ENLARGED, "increased": ENLARGED,
    "widened": ENLARGED, "widening": ENLARGED, "wide": ENLARGED, "prominent": BORDERLINE,
    "normal": NORMAL, "within normal limits": NORMAL, "unremarkable": NORMAL,
    "normal in size": NORMAL, "within normal limits in size": NORMAL, "wnl": NORMAL,
    "upper limits of normal": BORDERLINE, "upper limit of normal": BORDERLINE,
    "upper limits normal": BORDERLINE, "upper normal": BORDERLINE, "top normal": BORDERLINE,
    # "Borderline" grades a finding as mild rather than hedging it: "borderline cardiomegaly".
    "high normal": BORDERLINE, "borderline": ENLARGED, "borderline enlarged": ENLARGED,
    "borderline in size": ENLARGED, "top normal in size": BORDERLINE, "upper normal in size": BORDERLINE,
    "at the upper limits of normal": BORDERLINE, "mildly prominent": BORDERLINE,
}

# A state may follow its anatomy within this many words ("heart size and pulmonary
# vascularity are within normal limits"), or precede it by up to two ("normal heart size").
# Only a normal state is looked for across a comma ("heart size, mediastinal contours and
# vasculature are normal"); "stable heart size, enlarged and tortuous aorta" must not make
# the heart enlarged.
STATE_WORDS_AFTER = 10
STATE_WORDS_BEFORE = 2
