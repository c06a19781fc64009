"""Composing LoRA adapters per request: exact, unmerged, per-row mixtures on one frozen base model.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
