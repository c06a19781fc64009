"""Files on a local directory or ``s3://``: where each thing lives (``layout``), atomic
writes (``fs``), an adapter version's files and manifest (``artifacts``, ``manifest``),
purging versions (``purge``), and the private home (``privacy``).

No Ray here: everything that touches Ray lives in ``actors/``.
"""
