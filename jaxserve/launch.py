"""``python -m jaxserve.launch``: model + deployment -> instances -> orchestrator -> HTTP server.

    args --> DeploymentConfig (--plan plan.json | --config deploy.yaml | --mode)   [no jax yet]
         --> on a CPU host: enough virtual devices for the deployment (XLA_FLAGS, before jax)
         --> the persistent compilation cache (--compilation-cache; Ray actors get the same setting)
         --> load_model (HF folder / converted folder / built-in demo) + tokenizer
         --> instances in this process (build_engine) or as Ray actors (--ray / --ray-address),
             each looping on its own, behind one Router (jaxserve.runtime.router)
         --> aiohttp server on host:port (/health answers 503 until warm-up is done)
         --> warm-up (every jit shape, progress on stderr; from the cache on a second start), then the
             orchestrator starts and /health turns 200
    SIGINT / SIGTERM: stop admitting (503), let in-flight requests finish (up to
    --shutdown-timeout), abort the rest, stop the engine thread, release Ray actors.

With no arguments: the built-in demo model, one prefill + one decode instance on the
local devices, on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jaxserve import native
from jaxserve.compile_cache import enable_compilation_cache, setting
from jaxserve.config import ConfigError, DeploymentConfig, InstanceSpec, ensure_host_devices

MODES = ("disaggregated", "colocated", "chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxserve.launch",
        description="Serve an OPT model over an OpenAI-compatible HTTP API, with prefill and decode "
                    "on separate instances (DistServe-style) or colocated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF OPT folder or converted (orbax) folder; default: the built-in demo model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default=None, help="deployment YAML (see configs/deploy/)")
    src.add_argument("--plan", default=None, help="a plan JSON written by `python -m planner`")
    p.add_argument("--mode", default="disaggregated", choices=MODES,
                   help="without --config/--plan: disaggregated = 1 prefill + 1 decode instance; "
                        "colocated = one prefill-first instance; chunked = one chunked-prefill instance")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (visible in `ps`: prefer "
                        "$JAXSERVE_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from this file (its first line)")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before new ones get 503")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache per instance in GiB (default: on CPU half the host memory left after the "
                        "weights, split between the instances; on GPU 90%% of what the weights leave; at most "
                        "what --max-num-seqs sequences of --max-model-len tokens can use)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running sequences per instance")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: folder name)")
    p.add_argument("--ray", action="store_true", help="run each instance as a Ray actor on a local Ray")
    p.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster (implies --ray)")
    p.add_argument("--kv-transport", default="object-store", choices=["object-store", "collective"],
                   help="how KV moves between Ray actors: object-store (numpy through Ray's object store; "
                        "the faster one on a single CPU host, where it is shared memory) or collective "
                        "(the actors form one JAX group; a jitted ppermute over NCCL on GPUs, gloo on CPU; "
                        "needs --ray). A plan whose pipeline stages span nodes always forms the group (for "
                        "activations) and moves KV per stage through the object store")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every shape up front")
    p.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                   help="where compiled programs are kept between starts, so a second start compiles "
                        "nothing; off: compile at every start (unset: $JAXSERVE_COMPILATION_CACHE, else "
                        "$JAXSERVE_CACHE/xla, i.e. ~/.cache/jaxserve/xla)")
    _add_http_flags(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _add_http_flags(p: argparse.ArgumentParser) -> None:
    """The HTTP side's limits: shutdown, slow clients, connections, browsers."""
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on SIGINT/SIGTERM; the process exits "
                        "within about this + 1 s, slow clients included")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open; also the time a connection has "
                        "to send a request's headers")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds to receive a request's body (408 after)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections before new ones get 503 (unset: what the file-descriptor limit leaves "
                        "after the descriptors open at start and 228 more)")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGIN[,ORIGIN]",
                   help="browser origins allowed by CORS, e.g. http://localhost:3000, or * (unset: none; a "
                        "request carrying another Origin gets 403)")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST]",
                   help="Host names answered, or * (unset: loopback names when --host is loopback, "
                        "against DNS rebinding; any otherwise)")
    p.add_argument("--metrics-auth", action="store_true",
                   help="with an API key, /metrics needs it too")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn off automatic prefix caching (on by default: a prompt whose leading blocks match "
                        "cached KV skips computing them)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="jaxserve's log records at this level and above go to stderr")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per HTTP request (client, request line, status, bytes, seconds)")


ACCESS_FORMAT = '%a "%r" %s %b %Tf'  # client, request line, status, bytes, seconds (--access-log)
LINGER_S = 1.0  # after an early answer (408, 413, 415), the unread body is drained this long, then closed


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values argparse cannot check: a one-line CLI error naming the flag (exit 2)."""
    if args.kv_transport != "object-store" and not (args.ray or args.ray_address):
        p.error(f"--kv-transport {args.kv_transport} moves KV between Ray actors: add --ray or --ray-address "
                "(in one process KV moves with jax.device_put)")
    try:
        args.api_key = resolve_api_key(args.api_key, args.api_key_file, os.environ)
    except ValueError as e:
        p.error(str(e))
    for flag in ("shutdown_timeout", "keep_alive_timeout"):
        if not getattr(args, flag) >= 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0 seconds, got {getattr(args, flag)}")
    if not args.body_timeout > 0:
        p.error(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if args.max_connections is not None and args.max_connections <= 0:
        p.error(f"--max-connections must be positive, got {args.max_connections}")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue <= 0:
        p.error(f"--max-queue must be positive, got {args.max_queue}")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        p.error(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")


def deployment_from_args(args: argparse.Namespace) -> DeploymentConfig:
    if args.plan or args.config:
        return DeploymentConfig.load(args.plan or args.config)
    if args.mode == "disaggregated":
        return DeploymentConfig((InstanceSpec("prefill"), InstanceSpec("decode")))
    return DeploymentConfig((InstanceSpec("colocated"),))


def engine_defaults(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for name in ("kv_cache_gb", "max_model_len", "max_num_seqs"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.no_prefix_caching:
        kw["prefix_caching"] = False
    return kw


def build(args: argparse.Namespace, deployment: DeploymentConfig) -> tuple[Any, Any, Any, str, Any]:
    """(router, tokenizer, model config, model name, Ray placement or None) for the deployment."""
    import jax

    from jaxserve.engine.build import build_engine
    from jaxserve.model import demo
    from jaxserve.model.checkpoint import load_model
    from jaxserve.tokenizer import Tokenizer

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    model = args.model or deployment.model
    lm = load_model(model, dtype)
    tok = Tokenizer.from_dir(lm.tokenizer_dir) if lm.tokenizer_dir is not None else None
    name = args.served_model_name or (demo.DEMO_NAME if model is None else os.path.basename(os.path.normpath(model)))
    colocated_mode = "chunked" if args.mode == "chunked" else "colocated"
    kw = engine_defaults(args)
    if model is None:  # the demo is for trying things out: smaller limits, so warm-up compiles few shapes
        kw.setdefault("max_model_len", 512)
        kw.setdefault("max_num_seqs", 16)
    if args.ray or args.ray_address:
        engine, placement = _build_ray(args, deployment, model if model is not None else str(demo.ensure_demo_model()),
                                       dtype, kw, colocated_mode)
        return engine, tok, lm.cfg, name, placement
    engine = build_engine(lm.cfg, lm.params, deployment, mode_for_colocated=colocated_mode, **kw)
    return engine, tok, lm.cfg, name, None


def resolve_api_key(flag: str | None, path: str | None, environ: Any) -> str | None:
    """The API key from --api-key, else --api-key-file (first line), else $JAXSERVE_API_KEY; None: no key.
    Raises ValueError naming the problem (both flags, an unreadable or empty file)."""
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {path}: cannot read it ({type(e).__name__}: {e})") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"--api-key-file {path}: the file is empty")
        return lines[0].strip()
    if flag is not None:
        if not flag.strip():
            raise ValueError("--api-key must not be empty")
        return flag
    return environ.get("JAXSERVE_API_KEY") or None


def _build_ray(args: argparse.Namespace, deployment: DeploymentConfig, model: str, dtype: str,
               kw: dict[str, Any], mode_for_colocated: str = "colocated") -> tuple[Any, Any]:
    """(router, placement): one Ray actor per instance replica (prefill + decode, or colocated
    replicas), in placement groups."""
    import ray

    from jaxserve.cluster.ray_instance import launch_router
    from jaxserve.engine.build import instance_names

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False)
    from jaxserve.cluster.placement import place, release

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    placement = place(deployment, gpus=gpus)  # one bundle per replica, grouped by the plan's nodes
    ordered = [i for role in ("prefill", "decode", "colocated") for i in deployment.instances if i.role == role]
    roles = [i.role for i in ordered for _ in range(i.replicas)]  # the order of placement.options
    configs = [i.engine_config(mode_for_colocated, **kw) for i in ordered for _ in range(i.replicas)]
    try:
        engine = launch_router(model, list(zip(instance_names(roles), configs, strict=True)), dtype=dtype,
                               options=placement.options, compilation_cache=args.compilation_cache,
                               transport=args.kv_transport, stages=placement.stages)
    except BaseException:
        release(placement)
        raise
    groups = {k for k in placement.node_of_actor}
    n = len(placement.options) + sum(len(s) for s in placement.stages)  # instance actors + stage actors
    print(f"jaxserve: {n} Ray actors in {len(placement.groups)} placement group(s)"
          + (f" (plan nodes {sorted(groups)})" if None not in groups else ""), flush=True)
    return engine, placement


async def serve(args: argparse.Namespace, engine: Any, tokenizer: Any, cfg: Any, name: str,
                placement: Any = None) -> None:
    from aiohttp import web

    from jaxserve.serving.api_server import create_app
    from jaxserve.serving.connections import GuardedSite, default_max_connections, quiet_accept_errors
    from jaxserve.serving.orchestrator import Orchestrator
    from jaxserve.serving.origins import allowed_hosts, parse_list

    orch = Orchestrator(engine, tokenizer, max_queue=args.max_queue)
    ready = {"ok": False}
    app = create_app(orch, tokenizer, model_name=name, max_model_len=engine.max_model_len,
                     vocab_size=cfg.vocab_size, api_key=args.api_key, is_ready=lambda: ready["ok"],
                     body_timeout_s=args.body_timeout, allowed_origins=parse_list(args.allowed_origins) or (),
                     allowed_hosts=allowed_hosts(args.allowed_hosts, args.host), metrics_need_key=args.metrics_auth)
    # after the in-flight phase of a shutdown (--shutdown-timeout) every request has been answered or
    # cut; handlers still running then (a client trickling its body) get 1 s, not aiohttp's 60
    access = {"access_log": logging.getLogger("jaxserve.access"), "access_log_format": ACCESS_FORMAT} \
        if args.access_log else {"access_log": None}
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0,
                           keepalive_timeout=args.keep_alive_timeout, lingering_time=LINGER_S, **access)
    await runner.setup()
    quiet_accept_errors(asyncio.get_running_loop())
    site = GuardedSite(runner, args.host, args.port, max_connections=args.max_connections or default_max_connections())
    await site.start()
    print(f"jaxserve: serving {name} on http://{args.host}:{args.port} (warming up, progress on stderr...)",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not args.no_warmup:
        t0 = time.perf_counter()
        warm: asyncio.Future[Any] = loop.create_future()

        def run_warmup() -> None:  # a daemon thread, so Ctrl-C during warm-up can still exit
            try:
                n = engine.warmup(progress=True)
                loop.call_soon_threadsafe(lambda: warm.done() or warm.set_result(n))
            except Exception as e:  # surfaces in the event loop as the warm-up's failure
                loop.call_soon_threadsafe(lambda err=e: warm.done() or warm.set_exception(err))

        threading.Thread(target=run_warmup, name="jaxserve-warmup", daemon=True).start()
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([warm, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            print("jaxserve: interrupted during warm-up; exiting", flush=True)
            await runner.cleanup()
            return
        stopper.cancel()
        print(f"jaxserve: {warm.result()} step shapes ready (compiled or from the compilation cache) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    orch.start()
    ready["ok"] = True
    print(f"jaxserve: ready on http://{args.host}:{args.port}/v1 (model {name!r})", flush=True)
    await stop.wait()
    ready["ok"] = False
    await _shut_down(args, orch, runner, engine, placement)


async def _shut_down(args: argparse.Namespace, orch: Any, runner: Any, engine: Any, placement: Any) -> None:
    """No new requests; in-flight ones get --shutdown-timeout, the rest are cut (503); then the HTTP
    side (1 s for handlers still running), the engine, the Ray placement."""
    print("jaxserve: shutting down: no new requests; finishing the ones in flight", flush=True)
    orch.stop_admitting()
    deadline = time.monotonic() + args.shutdown_timeout
    while orch.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.get_running_loop().run_in_executor(None, orch.stop)
    await runner.cleanup()
    engine.shutdown()
    if placement is not None:
        from jaxserve.cluster.placement import release
        release(placement)
    print("jaxserve: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    from jaxserve.logs import show_logs

    args = parse_args(argv)
    show_logs(getattr(logging, args.log_level.upper()))  # e.g. each instance's KV pool size, and why
    native.build_in_background()  # the CPU kernels build (~4 s, once) while jax imports and the model loads
    try:
        deployment = deployment_from_args(args)
        ensure_host_devices(deployment.num_devices)
        cache = enable_compilation_cache(args.compilation_cache)  # before anything compiles; logs where
        args.compilation_cache = setting(cache)  # what each Ray actor uses
        engine, tok, cfg, name, placement = build(args, deployment)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args, engine, tok, cfg, name, placement))
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        if args.ray or args.ray_address:
            import ray
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
