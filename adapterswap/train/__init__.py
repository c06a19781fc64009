"""Training: which shards need it, one shard's LoRA run, and the job that publishes new versions.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
