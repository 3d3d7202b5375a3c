"""jaxserve.model."""
