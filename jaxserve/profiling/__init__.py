"""Measure jaxserve on the local devices and write the profile the planner reads.

    ``python -m jaxserve.profiling`` (cli) --> profile.profile_model: time the jitted steps over a
    grid of batch shapes (grid) --planner.fit--> coefficients --record--> profile JSON
    --engine-costs --> engine_costs: host costs around the steps and the KV export/import per request

This is the jax side of profiling; ``planner`` only fits and reads profiles and never imports jax.
"""
