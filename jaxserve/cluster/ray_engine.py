"""Disaggregated serving across Ray actors: the ``DisaggEngine`` loop, with instances in other processes.

    add_request --> the live prefill actor with the fewest queued prompt tokens (checked first on
                    every decode actor, as DisaggEngine does)
    step():
      every prefill actor steps (calls issued together, then collected)
      pull:  for each prefilled request (oldest first per prefill actor), the decode actor with
             the most free blocks that has room admits it (``try_admit``: one round trip), then
               prefill.export_kv(id) --ObjectRef--> decode.import_kv(id, dst blocks, ref)
               prefill.release(id)   (queued behind the export on the same actor)
             the KV bytes go prefill actor -> object store -> decode actor, never through the driver
      every decode actor steps
    abort_request: one call to the actor holding the request; its blocks are freed there at once

The driver keeps the caller's ``Request`` objects true: every actor reply carries the events and
tokens new since its previous reply (``RequestUpdate``), and the driver appends them; it stamps
transfer began/ended and decode queued itself, as ``DisaggEngine`` does. Dispatch keys (queued
tokens, free blocks) come from the stats in each reply, so they are fresh without extra calls.

Failures: every ``ray.get`` has a deadline. An actor that dies, times out, or raises inside
``step`` is killed and marked dead; each request it held ends with ``FinishReason.ERROR``
(an ``ABORTED`` event, a ``StepOutput(id, -1, ERROR)`` from the next ``step()``, and the reason
in ``failures[id]``). New requests go to live actors only; with no live decode actor, prefilled
requests fail instead of waiting forever. Application errors in ``add_request`` (a prompt that
can never fit) are raised to the caller unwrapped, as in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayError, RayTaskError

from jaxserve.cluster.actors import (
    ActorOptions,
    InstanceInfo,
    InstanceStats,
    Reply,
    StepResult,
    start_instance,
)
from jaxserve.config import EngineConfig
from jaxserve.engine.engine import StepOutput
from jaxserve.request import Event, FinishReason, Request

log = logging.getLogger(__name__)

NO_TOKEN = -1  # token_id of a StepOutput that ends a request with ERROR


class ClusterError(RuntimeError):
    """The cluster cannot serve (no live instance of a role, an actor failed to start)."""


class InstanceFailed(RuntimeError):
    """An actor died or stopped answering; it has been marked dead and its requests failed."""


@dataclasses.dataclass(eq=False)
class Instance:
    """The driver's view of one instance actor."""

    actor: Any
    info: InstanceInfo
    stats: InstanceStats
    ready: list[str] = dataclasses.field(default_factory=list)  # prefill: held for transfer, oldest first
    error: str | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def alive(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class _Transfer:
    src: Instance
    dst: Instance
    request: Request
    imported: Any  # ObjectRef of dst.import_kv
    released: Any  # ObjectRef of src.release


class RayDisaggEngine:
    """Same surface as ``DisaggEngine`` (``add_request``, ``step``, ``abort_request``, ``has_unfinished``,
    ``cfg``, ``max_model_len``, ``held_blocks``), over prefill and decode ``InstanceActor`` handles."""

    def __init__(self, prefills: Sequence[Any], decodes: Sequence[Any], *, timeout_s: float = 300.0,
                 start_timeout_s: float = 600.0, own_actors: bool = False) -> None:
        if not prefills or not decodes:
            raise ValueError("disaggregation needs at least one prefill and one decode instance")
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._owned = list(prefills) + list(decodes) if own_actors else []
        handles = [*prefills, *decodes]
        refs = [(h, h.info.remote(), h.stats.remote()) for h in handles]
        insts = []
        deadline = time.monotonic() + start_timeout_s
        try:
            for h, info_ref, stats_ref in refs:
                left = max(0.0, deadline - time.monotonic())
                info, stats = ray.get([info_ref, stats_ref], timeout=left)
                insts.append(Instance(h, info, stats))
        except (RayError, GetTimeoutError) as e:
            self.shutdown()
            raise ClusterError(f"an instance actor did not start: {e}") from e
        self.prefills, self.decodes = insts[: len(prefills)], insts[len(prefills):]
        self.cfg = self.prefills[0].info.cfg
        try:
            for i in self.prefills:
                if i.info.mode != "prefill":
                    raise ValueError(f"instance {i.name} is {i.info.mode!r}, expected a prefill instance")
            for i in self.decodes:
                if i.info.mode != "decode":
                    raise ValueError(f"instance {i.name} is {i.info.mode!r}, expected a decode instance")
            if any(i.info.cfg != self.cfg for i in self.instances):
                raise ValueError("instances serve different models: " + ", ".join(i.name for i in self.instances))
        except ValueError:
            self.shutdown()
            raise
        self.max_model_len = min(i.info.max_model_len for i in self.instances)
        self.where: dict[str, Instance] = {}  # request id -> the instance holding it
        self.requests: dict[str, Request] = {}  # the caller's Request objects, kept true
        self.failures: dict[str, str] = {}  # request id -> why it ended with ERROR
        self.num_transfers = 0
        self.transfer_bytes = 0
        self._errors: list[StepOutput] = []

    @classmethod
    def launch(cls, model: str | os.PathLike[str] | None, prefill: Sequence[EngineConfig],
               decode: Sequence[EngineConfig], *, dtype: str = "float32",
               options: ActorOptions | Sequence[ActorOptions] | None = None, **kw: Any) -> RayDisaggEngine:
        """Start one actor per config (``prefill-i``, ``decode-j``; ``options`` one for all, or one each in
        that order) and wait until every model is loaded. The engine owns them: ``shutdown`` kills them."""
        configs = [("prefill", c) for c in prefill] + [("decode", c) for c in decode]
        opts = list(options) if isinstance(options, Sequence) else [options] * len(configs)
        if len(opts) != len(configs):
            raise ValueError(f"{len(opts)} ActorOptions for {len(configs)} instances")
        handles = [start_instance(model, c, f"{role}-{n}", dtype=dtype, options=o)
                   for n, ((role, c), o) in enumerate(zip(configs, opts, strict=True))]
        return cls(handles[: len(prefill)], handles[len(prefill):], own_actors=True, **kw)

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def instances(self) -> list[Instance]:
        return [*self.prefills, *self.decodes]

    @staticmethod
    def live(instances: Sequence[Instance]) -> list[Instance]:
        return [i for i in instances if i.alive]

    def _call(self, inst: Instance, ref: Any, deadline: float | None = None) -> Any:
        """``ray.get`` with a deadline; applies a ``Reply``'s updates and stats and returns its value.

        Dead / silent actor: marks it failed and raises InstanceFailed. An exception raised by the
        actor's method: re-raised as the original exception (the actor is still alive)."""
        timeout = self.timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out = ray.get(ref, timeout=timeout)
        except GetTimeoutError as e:
            self._fail(inst, f"no reply within {timeout:.0f} s")
            raise InstanceFailed(inst.error) from e
        except RayTaskError as e:
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None
        except ObjectLostError:
            raise  # an object (a transfer's KV) was lost, not necessarily this actor
        except RayError as e:  # RayActorError / ActorDiedError, WorkerCrashedError, NodeDiedError, ...
            self._fail(inst, f"actor died: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise InstanceFailed(inst.error) from e
        if isinstance(out, Reply):
            for u in out.updates:
                req = self.requests.get(u.request_id)
                if req is not None:
                    u.apply(req)
            inst.stats = out.stats
            return out.value
        return out

    def _fail(self, inst: Instance, why: str) -> None:
        """Mark an instance dead, kill its actor, end every request it held with ERROR."""
        if not inst.alive:
            return
        inst.error = f"{inst.name}: {why}"
        log.error("instance failed: %s", inst.error)
        try:
            ray.kill(inst.actor, no_restart=True)
        except Exception:  # already gone
            pass
        for rid, where in list(self.where.items()):
            if where is inst:
                self._fail_request(rid, inst.error)
        inst.ready.clear()

    def _fail_request(self, rid: str, why: str) -> None:
        self.where.pop(rid, None)
        for i in self.prefills:
            if rid in i.ready:
                i.ready.remove(rid)
        req = self.requests.pop(rid, None)
        if req is None:
            return
        req.finish_reason = FinishReason.ERROR
        req.stamp(Event.ABORTED, instance=why.split(":", 1)[0])
        self.failures[rid] = why
        self._errors.append(StepOutput(rid, NO_TOKEN, FinishReason.ERROR))

    def _drop_on(self, inst: Instance, rid: str) -> None:
        """Best effort: free a request's blocks on an instance (after a failed transfer)."""
        if inst.alive:
            try:
                self._call(inst, inst.actor.abort.remote(rid, FinishReason.ERROR))
            except Exception as e:  # InstanceFailed has already cleaned up; anything else: log it
                log.warning("%s: could not drop %s after a failed transfer: %s", inst.name, rid, e)

    # ---- the engine surface --------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise ValueError if the request could never run on a decode instance (the prefill side checks
        itself in ``add_request``)."""
        decodes = self.live(self.decodes)
        refs = [(d, d.actor.check_request.remote(request)) for d in decodes]
        deadline = time.monotonic() + self.timeout_s
        for d, ref in refs:
            try:
                self._call(d, ref, deadline)
            except InstanceFailed:
                continue
        if not self.live(self.decodes):
            raise ClusterError(f"no live decode instance ({self._why(self.decodes)})")

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.where:
            raise ValueError(f"duplicate request id {rid!r}")
        self.check_request(request)
        self.requests[rid] = request
        while live := self.live(self.prefills):
            p = min(live, key=lambda i: i.stats.queued_tokens)
            try:
                self._call(p, p.actor.add_request.remote(request))
            except InstanceFailed:
                continue  # try the next live prefill instance
            except BaseException:
                self.requests.pop(rid, None)
                raise
            self.where[rid] = p
            return
        self.requests.pop(rid, None)
        raise ClusterError(f"no live prefill instance ({self._why(self.prefills)})")

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        inst = self.where.get(request_id)
        if inst is None:
            return False
        try:
            ok = self._call(inst, inst.actor.abort.remote(request_id, reason))
        except InstanceFailed:
            return True  # the failure ended it (ERROR) and the actor's memory is gone with it
        self.where.pop(request_id, None)
        self.requests.pop(request_id, None)
        if request_id in inst.ready:
            inst.ready.remove(request_id)
        return bool(ok)

    def has_unfinished(self) -> bool:
        return bool(self.where) or bool(self._errors)

    def step(self) -> list[StepOutput]:
        outs = self._step_all(self.live(self.prefills))
        self.pull()
        outs += self._step_all(self.live(self.decodes))
        outs += self._errors
        self._errors = []
        for o in outs:
            if o.finish_reason is not None:
                self.where.pop(o.request_id, None)
                self.requests.pop(o.request_id, None)
        return outs

    def _step_all(self, insts: Sequence[Instance]) -> list[StepOutput]:
        refs = [(i, i.actor.step.remote()) for i in insts]  # all actors step at once
        deadline = time.monotonic() + self.timeout_s
        outs: list[StepOutput] = []
        for i, ref in refs:
            try:
                res: StepResult = self._call(i, ref, deadline)
            except InstanceFailed:
                continue
            except Exception as e:  # the engine raised mid-step: its state is unknown
                self._fail(i, f"step raised {type(e).__name__}: {e}")
                continue
            outs += res.outputs
            if i in self.prefills:
                i.ready = [r for r in res.ready if r in self.where]
        return outs

    # ---- KV hand-off ---------------------------------------------------------------------------
    def pull(self) -> int:
        """Move every prefilled request a decode actor has room for; returns how many moved."""
        moved: list[_Transfer] = []
        for p in self.live(self.prefills):
            if not self.live(self.decodes):
                for rid in list(p.ready):
                    self._drop_on(p, rid)
                    self._fail_request(rid, f"no live decode instance ({self._why(self.decodes)})")
                continue
            for rid in list(p.ready):
                req = self.requests[rid]
                placed = self._place(req)
                if placed is None:
                    break  # keep FCFS order on this prefill actor; its memory is the queue buffer
                d, dst = placed
                p.ready.remove(rid)
                req.stamp(Event.TRANSFER_BEGAN, instance=f"{p.name}->{d.name}")
                kv = p.actor.export_kv.remote(rid)
                moved.append(_Transfer(p, d, req, d.actor.import_kv.remote(rid, dst, kv),
                                       p.actor.release.remote(rid)))
        for t in moved:  # exports and imports of the whole pull run concurrently
            self._finish(t)
        return len(moved)

    def _place(self, req: Request) -> tuple[Instance, list[int]] | None:
        """The decode actor with the most free blocks among those with room admits ``req``."""
        for d in sorted(self.live(self.decodes), key=lambda i: -i.stats.free_blocks):
            try:
                dst = self._call(d, d.actor.try_admit.remote(req))
            except InstanceFailed:
                continue
            if dst is not None:
                return d, dst
        return None

    def _finish(self, t: _Transfer) -> None:
        p, d, rid = t.src, t.dst, t.request.request_id
        deadline = time.monotonic() + self.timeout_s
        try:  # release runs after export on the same actor: success means the KV left p
            self._call(p, t.released, deadline)
        except InstanceFailed:  # p's failure has failed rid (still placed on p)
            self._drop_on(d, rid)
            return
        except Exception as e:
            self._drop_on(p, rid)
            self._drop_on(d, rid)
            self._fail_request(rid, f"{p.name}: export of {rid} failed: {e}")
            return
        try:
            self.transfer_bytes += self._call(d, t.imported, deadline)
        except InstanceFailed:
            self._fail_request(rid, d.error or f"{d.name} failed")
            return
        except Exception as e:  # import raised, or the export's error reached it
            self._drop_on(d, rid)
            self._fail_request(rid, f"{p.name}->{d.name}: transfer of {rid} failed: {type(e).__name__}: {e}")
            return
        self.where[rid] = d
        t.request.stamp(Event.TRANSFER_ENDED, instance=f"{p.name}->{d.name}")
        t.request.stamp(Event.DECODE_QUEUED, instance=d.name)
        self.num_transfers += 1

    # ---- introspection and lifecycle -----------------------------------------------------------
    def held_blocks(self) -> dict[str, int]:
        """KV blocks in use on each live instance (asked now, not cached)."""
        live = self.live(self.instances)
        refs = [(i, i.actor.stats.remote()) for i in live]
        deadline = time.monotonic() + self.timeout_s
        out = {}
        for i, ref in refs:
            try:
                i.stats = self._call(i, ref, deadline)
            except InstanceFailed:
                continue
            out[i.name] = i.stats.held_blocks
        return out

    def warmup(self) -> int:
        """Compile every step shape on every live actor (concurrently); returns the number of shapes."""
        refs = [(i, i.actor.warmup.remote()) for i in self.live(self.instances)]
        deadline = time.monotonic() + self.start_timeout_s
        return sum(self._call(i, ref, deadline) for i, ref in refs)

    @property
    def compilations_since_warmup(self) -> int:
        refs = [(i, i.actor.compilations_since_warmup.remote()) for i in self.live(self.instances)]
        return sum(self._call(i, ref) for i, ref in refs)

    def _why(self, insts: Sequence[Instance]) -> str:
        return "; ".join(i.error or f"{i.name}: alive" for i in insts)

    def shutdown(self) -> None:
        """Kill the actors this engine started (``launch``); handles passed in are left to their owner."""
        for h in self._owned:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        self._owned = []

    def __enter__(self) -> RayDisaggEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
