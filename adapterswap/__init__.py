"""AdapterSwap: access-controlled, deletable, continually-learned LLM knowledge.

Documents are split by access group into shards; one LoRA adapter is trained per shard
on a frozen base model; a router composes the adapters a caller may use per request.
Importing this package starts nothing: no Ray, no model loading.
"""

__version__ = "0.1.0"

from adapterswap.api.client import Client  # noqa: E402  (importing it starts nothing)

__all__ = ["Client", "__version__"]
