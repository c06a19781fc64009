"""The AdapterStore's state: adapters, versions, lineage, keys, jobs, deletions, leases, epoch.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
