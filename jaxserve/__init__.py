"""jaxserve: disaggregated prefill/decode serving of OPT models in JAX."""

__version__ = "0.1.0"
