"""The ``adapterswap`` command line, one module per command group, and the demo.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
