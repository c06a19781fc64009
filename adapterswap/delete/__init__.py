"""Deletion: revoke, wait for every replica, retrain the affected shards, purge; and verify-forget.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
