"""The HTTP API: the FastAPI app, authentication, request schemas, the gateway (inference and
admin endpoints, wired by ``build_gateway``), OpenAI response shapes, errors and the Python client.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
