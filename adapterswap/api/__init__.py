"""The HTTP API: authentication, request schemas, the gateway, OpenAI-shaped responses and the Python client.

No Ray here: everything that touches Ray lives in ``actors/``.
"""
