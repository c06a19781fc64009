"""A model replica: generation, scoring, the adapter versions it reads back from storage
(``adapter_source``), and the epoch watch that makes revocation a barrier.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
