"""kad-pipeline: knowledge-enhanced chest X-ray pre-training (KAD) as a data pipeline."""

__version__ = "0.1.0"
