"""Routing: per-shard statistics, the active set a replica serves, and the top-k router.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
