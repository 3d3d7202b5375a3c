"""The runtime above one instance: typed contracts (api), the router, instances in threads."""
