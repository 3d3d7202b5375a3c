"""jaxserve.engine."""
