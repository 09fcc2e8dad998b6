"""amslocal: a local GGUF runtime whose KV cache stays inside a fixed token budget.

The runtime drives a patched llama.cpp (through llama-cpp-python) with its own decode loop and
compresses the KV cache with Adaptive Mass-Segmented eviction. Importing this package is cheap and
never loads the native backend; ``amslocal.backend`` does that, and raises
:class:`amslocal.errors.BackendMissingError` when the loaded library is not the patched build.
"""

__version__ = "0.1.0"
