"""jaxserve.serving."""
