"""Operating a home: backup and restore, status.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
