"""Zero-shot evaluation: dataset readers, scoring, metrics with bootstrap intervals, grounding, report."""
