"""Storage of files (catalog, adapter versions) on a local directory or ``s3://``.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
