"""Evaluation: FLOPs (and, later, reconstruction and generation metrics)."""
