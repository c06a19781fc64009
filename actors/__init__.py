"""Ray actors: thin wrappers that put plain AdapterSwap classes behind ``ray.remote``."""
