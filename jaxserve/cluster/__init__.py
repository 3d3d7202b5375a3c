"""jaxserve.cluster: engine instances as Ray actors.

    actors.py      InstanceActor (an LLMEngine in its own process, own XLA devices), ActorOptions
                   (num_cpus/gpus, resources, node hint, scheduling strategy: the placement seam),
                   start_instance, and the records that cross processes (Reply, RequestUpdate,
                   InstanceStats, KVPayload)
    ray_engine.py  RayDisaggEngine: the DisaggEngine loop over prefill/decode actors; KV moves
                   actor -> object store -> actor as numpy

Nothing here is imported by ``import jaxserve``; Ray is only needed when this package is used.
"""
