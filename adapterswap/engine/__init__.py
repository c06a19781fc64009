"""A model replica: generation, scoring, and the epoch watch that makes revocation a barrier.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
