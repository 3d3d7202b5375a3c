"""From a deployment description to running instances in this process.

    DeploymentConfig (YAML / plan JSON) or [(role, EngineConfig)]
      --expand replicas, assign devices (explicit ids, else consecutive slices of jax.devices())-->
    one LLMEngine (colocated) or a DisaggEngine (prefill + decode instances on disjoint meshes)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxserve.config import ConfigError, DeploymentConfig, EngineConfig, ModelConfig
from jaxserve.engine.disagg import DisaggEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.kv_transfer import KVTransport
from jaxserve.parallel.devices import devices_by_ids, split_devices


def build_instances(cfg: ModelConfig, params: Any, layouts: Sequence[tuple[str, EngineConfig]],
                    device_sets: Sequence[Sequence[Any]], transport: KVTransport | None = None
                    ) -> LLMEngine | DisaggEngine:
    engines = [LLMEngine(cfg, params, c, devices=ds, name=f"{role}-{i}")
               for i, ((role, c), ds) in enumerate(zip(layouts, device_sets, strict=True))]
    pre = [e for e in engines if e.config.mode == "prefill"]
    dec = [e for e in engines if e.config.mode == "decode"]
    if not pre and not dec:
        if len(engines) != 1:
            raise ConfigError(f"{len(engines)} colocated replicas run as Ray actors (python -m jaxserve.launch "
                              "--ray); in one process, run one colocated instance")
        return engines[0]
    return DisaggEngine(pre, dec, transport)


def build_local(cfg: ModelConfig, params: Any, layouts: Sequence[tuple[str, EngineConfig]],
                devices: Sequence[Any] | None = None, transport: KVTransport | None = None
                ) -> LLMEngine | DisaggEngine:
    """Instances from ``[(role, EngineConfig), ...]`` on consecutive device slices."""
    devices = list(devices) if devices is not None else jax.devices()
    sets = split_devices(devices, [c.tp * c.pp for _, c in layouts])
    return build_instances(cfg, params, layouts, sets, transport)


def build_engine(cfg: ModelConfig, params: Any, deployment: DeploymentConfig, *, mode_for_colocated: str = "colocated",
                 transport: KVTransport | None = None, **engine_defaults: Any) -> LLMEngine | DisaggEngine:
    """Every instance of ``deployment`` in this process; ``engine_defaults`` fill unset EngineConfig fields."""
    layouts: list[tuple[str, EngineConfig]] = []
    explicit: list[list[Any] | None] = []
    for spec in deployment.instances:
        per = spec.tp * spec.pp
        for r in range(spec.replicas):
            layouts.append((spec.role, spec.engine_config(mode_for_colocated, **engine_defaults)))
            explicit.append(devices_by_ids(list(spec.devices[r * per:(r + 1) * per]))
                            if spec.devices is not None else None)
    if all(e is None for e in explicit):
        if deployment.num_devices > len(jax.devices()):
            raise ConfigError(f"the deployment needs {deployment.num_devices} devices, this host has "
                              f"{len(jax.devices())} (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return build_local(cfg, params, layouts, jax.devices(), transport)
    if any(e is None for e in explicit):
        raise ConfigError("give device ids for every instance, or for none")
    used = [d.id for e in explicit for d in e]  # type: ignore[union-attr]
    if len(set(used)) != len(used):
        raise ConfigError(f"device ids overlap between instances: {sorted(used)}")
    return build_instances(cfg, params, layouts, explicit, transport)  # type: ignore[arg-type]
