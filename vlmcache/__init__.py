"""vlmcache: long-tailed classification with frozen CLIP encoders, extracted once and cached in HDF5."""

from vlmcache.errors import VlmcacheError

__version__ = "0.1.0"
__all__ = ["VlmcacheError", "__version__"]
