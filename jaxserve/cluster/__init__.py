"""jaxserve.cluster."""
