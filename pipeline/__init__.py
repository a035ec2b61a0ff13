"""Thin command-line stages of the DVC pipeline (``python -m pipeline.<stage>``) and the Prefect flows."""
