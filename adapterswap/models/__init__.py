"""The frozen models: the base model every adapter is trained on, and the sentence embedder.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
