"""From a deployment description to running instances in this process.

    DeploymentConfig (YAML / plan JSON) or [(role, EngineConfig)]
      --expand replicas, assign devices (explicit ids, else consecutive slices of jax.devices())-->
    one LLMEngine per instance on its own mesh (one KV transport shared by all; each prefill
    instance knows its decode peers, so its warm-up compiles the hand-offs into them; instances
    on CPU devices size their KV pools from one host measurement, split evenly between them)
      --each in a LocalInstance (its own thread)--> one Router over them (jaxserve.runtime.router)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxserve.config import ConfigError, DeploymentConfig, EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.kv_transfer import KVTransport, LocalTransport
from jaxserve.memory import MemoryInfo, host_memory
from jaxserve.parallel.devices import devices_by_ids, split_devices
from jaxserve.runtime.instance import LocalInstance
from jaxserve.runtime.router import Router


def instance_names(roles: Sequence[str]) -> list[str]:
    """``prefill-0, prefill-1, decode-0, ...``: numbered within each role."""
    seen: dict[str, int] = {}
    out = []
    for r in roles:
        out.append(f"{r}-{seen.get(r, 0)}")
        seen[r] = seen.get(r, 0) + 1
    return out


def memory_shares(device_sets: Sequence[Sequence[Any]]) -> list[MemoryInfo | None]:
    """Per instance: an even share of the host's memory, measured once before any is built, for
    instances on CPU devices (they all draw on it); None for the others (each measures its own devices)."""
    on_host = [all(d.platform == "cpu" for d in ds) for ds in device_sets]
    host = host_memory() if any(on_host) else None
    share = host.share(sum(on_host)) if host is not None else None
    return [share if cpu else None for cpu in on_host]


def build_instances(cfg: ModelConfig, params: Any, layouts: Sequence[tuple[str, EngineConfig]],
                    device_sets: Sequence[Sequence[Any]], transport: KVTransport | None = None) -> Router:
    transport = transport or LocalTransport()
    names = instance_names([role for role, _ in layouts])
    memory = memory_shares(device_sets)
    engines = [LLMEngine(cfg, params, c, devices=ds, name=n, transport=transport, memory=m)
               for n, (_, c), ds, m in zip(names, layouts, device_sets, memory, strict=True)]
    decodes = [e for e in engines if e.config.mode == "decode"]
    for e in engines:
        if e.config.mode == "prefill":
            e.transfer_peers = decodes
    return Router([LocalInstance(e) for e in engines])


def build_local(cfg: ModelConfig, params: Any, layouts: Sequence[tuple[str, EngineConfig]],
                devices: Sequence[Any] | None = None, transport: KVTransport | None = None) -> Router:
    """Instances from ``[(role, EngineConfig), ...]`` on consecutive device slices."""
    devices = list(devices) if devices is not None else jax.devices()
    sets = split_devices(devices, [c.tp * c.pp for _, c in layouts])
    return build_instances(cfg, params, layouts, sets, transport)


def build_engine(cfg: ModelConfig, params: Any, deployment: DeploymentConfig, *, mode_for_colocated: str = "colocated",
                 transport: KVTransport | None = None, **engine_defaults: Any) -> Router:
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
