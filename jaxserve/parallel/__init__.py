"""jaxserve.parallel."""
