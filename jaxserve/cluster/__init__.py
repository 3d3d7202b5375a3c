"""jaxserve.cluster: engine instances as Ray actors.

    actors.py        InstanceActor (the runtime's LocalInstance loop in its own process, own XLA
                     devices), ObjectStoreTransport, ActorOptions (the placement seam), start_instance
    ray_instance.py  RayInstance: the runtime's Instance interface over remote calls (a pump thread
                     long-polls the actor); launch_router / connect: actors -> the one Router
    placement.py     placement groups per plan node

Nothing here is imported by ``import jaxserve``; Ray is only needed when this package is used.
"""
