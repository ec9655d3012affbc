"""Query entity names of KAD: the findings the Disease Query Network is asked about."""

# The 41 query entities of the KAD reference code, in its order. Some are word stems
# ("pleural thicken", "hyperinflate", "blunt") because the reference vocabulary was built
# from stemmed report mentions. They are kept verbatim so released checkpoints line up.
KAD_QUERIES: tuple[str, ...] = (
    "normal", "pleural effusion", "opacity", "pneumothorax", "edema", "atelectasis",
    "tube", "consolidation", "enlarged cardiomediastinum", "tip", "pneumonia", "line",
    "cardiomegaly", "fracture", "calcification", "device", "engorgement", "nodule",
    "wire", "pacemaker", "pleural thicken", "marking", "scar", "hyperinflate", "blunt",
    "collapse", "emphysema", "aerate", "mass", "infiltration", "obscure", "deformity",
    "hernia", "drainage", "distention", "shift", "stent", "lesion", "hardware",
    "dilation", "aspiration",
)
