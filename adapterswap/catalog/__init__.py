"""Ingest: reading records, validating documents, planning shards and appending to the Parquet catalog.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
