"""The ``adapterswap`` command line, one module per command group, and the demo.

The edge of the library: it imports no Ray itself, but it wires ``actors/`` in (the Ray Train
launcher, the Ray job client, Ray and Serve start-up), which the rest of the library may not
(adapterswap/ruff.toml and adapterswap/cli/ruff.toml say so to ruff).
"""
