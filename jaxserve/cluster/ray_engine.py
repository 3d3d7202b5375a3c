"""Serving across Ray actors: prefill + decode instances (disaggregated) or colocated replicas.

Every actor works on its own: the driver never waits on one actor while another could step.

    add_request --> checked in the driver (each instance's limits), seed fixed, sent to the live
                    entry actor (prefill, or colocated replica) with the fewest queued prompt tokens
    step():
      kick:     every live actor with work and no step in flight gets step.remote() (prefill
                actors step(export=True): the KV of each request they finish prefilling is put
                in the object store as numpy right away, so the hand-off never waits on them)
      collect:  ray.wait on every call in flight (up to ``poll_s`` for the first); replies are read
                per actor in call order (an actor runs its calls in the order they were sent)
      pull:     each prefilled request, oldest first per prefill actor, goes to the decode actor
                with the most free blocks: decode.admit_import(request, kv_ref) is queued there
                (Ray pulls the KV meanwhile; admit if there is room, write the KV between transfer
                began / ended, stamped by that actor, so waiting behind its running step is decode
                queue);
                refused (no room after all): back to the head of its queue. Once landed, the
                prefill actor's ``release`` frees its blocks (its memory is the queue buffer).
      return the outputs read.
    abort_request: ends the request in the driver at once; an abort is queued on the actor holding
                   it (and on the target of a hand-off in flight), so its blocks are freed there
                   right after the calls already sent.

The driver keeps the caller's ``Request`` objects true: every actor reply carries the events and
tokens new since its previous reply (``RequestUpdate``), and the driver appends them. Dispatch keys
(queued tokens, free blocks) come from the stats in each reply, updated optimistically in between.

Failures: every call has a deadline (``timeout_s``, checked on each collect). An actor that dies,
times out, or raises inside ``step`` is killed and marked dead; each request it held (or was
receiving) ends with ``FinishReason.ERROR`` (an ``ABORTED`` event, a ``StepOutput(id, -1, ERROR)``
from the next ``step()``, the reason in ``failures[id]``), and a source still holding that
request's KV frees it. New requests go to live actors only; with no live decode actor, prefilled
requests fail instead of waiting forever. A request that can never fit raises ValueError in
``add_request``, as in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
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
from jaxserve.engine.block_manager import blocks_needed
from jaxserve.engine.engine import StepOutput
from jaxserve.engine.scheduler import check_fits
from jaxserve.errors import EngineUnavailable
from jaxserve.request import Event, FinishReason, Request

log = logging.getLogger(__name__)

NO_TOKEN = -1  # token_id of a StepOutput that ends a request with ERROR


class ClusterError(EngineUnavailable):
    """The cluster cannot serve (no live instance of a role, an actor failed to start): HTTP 503."""


class InstanceFailed(RuntimeError):
    """An actor died or stopped answering; it has been marked dead and its requests failed."""


@dataclasses.dataclass(eq=False)
class Instance:
    """The driver's view of one instance actor."""

    actor: Any
    info: InstanceInfo
    stats: InstanceStats
    # prefill: (request id, ObjectRef of its exported KV) held for transfer, oldest first
    ready: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    error: str | None = None
    calls: list[_Call] = dataclasses.field(default_factory=list)  # submitted, reply not yet read (in order)
    stepping: bool = False  # a step() call is among ``calls``
    kicked: bool = False  # new work was sent since its last step was submitted
    full: bool = False  # decode: refused a hand-off; no more until its next step ends
    clock_offset: float = 0.0  # the actor's event clock minus the driver's (0 on the driver's node)
    clock_error: float = 0.0  # bound on that estimate (half the round trip it came from)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def ready_ids(self) -> list[str]:
        return [rid for rid, _ in self.ready]


@dataclasses.dataclass(eq=False)
class _Call:
    ref: Any
    kind: str  # add | step | admit_import | release | abort
    rid: str | None
    submitted: float
    src: Instance | None = None  # admit_import: the prefill instance the KV comes from
    kv: Any = None  # admit_import: the KV ObjectRef (kept to re-queue on refusal)


def estimate_clock_offset(remote_clock: Callable[[], float], samples: int = 7,
                          local_clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(remote - local clock offset, error bound) from ``samples`` round trips, NTP-style: the remote
    reading is taken as the midpoint of its round trip; the shortest round trip wins (its half is
    the bound)."""
    best = (0.0, float("inf"))
    for _ in range(max(1, samples)):
        t0 = local_clock()
        r = remote_clock()
        t1 = local_clock()
        if (t1 - t0) / 2 < best[1]:
            best = (r - (t0 + t1) / 2, (t1 - t0) / 2)
    return best


class RayDisaggEngine:
    """Same surface as ``DisaggEngine`` (``add_request``, ``step``, ``abort_request``, ``has_unfinished``,
    ``cfg``, ``max_model_len``, ``held_blocks``), over prefill and decode ``InstanceActor`` handles, or
    over colocated replicas (``colocated=``: each runs whole requests; new ones go to the least loaded).

    Nothing waits on one actor while another could work: every actor steps on its own as soon as its
    previous step ends and it has work; ``step()`` collects whatever replies are in (waiting at most
    ``poll_s``) and returns their outputs. Calls to an actor run in the order they were sent, so a
    request added (or a KV imported) before a step is in that step."""

    def __init__(self, prefills: Sequence[Any], decodes: Sequence[Any], *, colocated: Sequence[Any] = (),
                 timeout_s: float = 300.0, start_timeout_s: float = 600.0, poll_s: float = 0.02,
                 own_actors: bool = False) -> None:
        if colocated and (prefills or decodes):
            raise ValueError("an engine runs either colocated replicas or prefill + decode instances")
        if not colocated and (not prefills or not decodes):
            raise ValueError("disaggregation needs at least one prefill and one decode instance")
        self.timeout_s, self.start_timeout_s, self.poll_s = timeout_s, start_timeout_s, poll_s
        self._owned = [*prefills, *decodes, *colocated] if own_actors else []
        self.placement: Any = None  # jaxserve.cluster.placement.Placement when the launcher placed the actors
        handles = [*prefills, *decodes, *colocated]
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
        here = ray.get_runtime_context().get_node_id()
        try:
            for i in insts:  # one host shares CLOCK_MONOTONIC: only actors on other nodes get an offset
                if i.info.node_id is not None and i.info.node_id != here:
                    timeout = max(1.0, deadline - time.monotonic())
                    i.clock_offset, i.clock_error = estimate_clock_offset(
                        lambda a=i.actor, t=timeout: ray.get(a.clock.remote(), timeout=t))
                    log.info("%s: clock offset %+.3f ms (+-%.3f ms)", i.name, 1e3 * i.clock_offset,
                             1e3 * i.clock_error)
        except (RayError, GetTimeoutError) as e:
            self.shutdown()
            raise ClusterError(f"an instance actor did not answer its clock: {e}") from e
        n_p, n_d = len(prefills), len(decodes)
        self.prefills, self.decodes, self.colocated = insts[:n_p], insts[n_p:n_p + n_d], insts[n_p + n_d:]
        self.cfg = insts[0].info.cfg
        try:
            for group, modes in ((self.prefills, ("prefill",)), (self.decodes, ("decode",)),
                                 (self.colocated, ("colocated", "chunked"))):
                for i in group:
                    if i.info.mode not in modes:
                        raise ValueError(f"instance {i.name} is {i.info.mode!r}, expected a {modes[0]} instance")
            if any(i.info.cfg != self.cfg for i in self.instances):
                raise ValueError("instances serve different models: " + ", ".join(i.name for i in self.instances))
        except ValueError:
            self.shutdown()
            raise
        self.max_model_len = min(i.info.max_model_len for i in self.instances)
        self.where: dict[str, Instance] = {}  # request id -> the instance holding it (the source mid-transfer)
        self.requests: dict[str, Request] = {}  # the caller's Request objects, kept true
        self.failures: dict[str, str] = {}  # request id -> why it ended with ERROR
        self.transit: dict[str, _Call] = {}  # request id -> its admit_import call
        self.num_transfers = 0
        self.transfer_bytes = 0
        self._outs: list[StepOutput] = []
        self._rng = random.Random()

    @classmethod
    def launch(cls, model: str | os.PathLike[str] | None, prefill: Sequence[EngineConfig],
               decode: Sequence[EngineConfig], *, colocated: Sequence[EngineConfig] = (), dtype: str = "float32",
               options: ActorOptions | Sequence[ActorOptions] | None = None, **kw: Any) -> RayDisaggEngine:
        """Start one actor per config (``prefill-i``, ``decode-j``, ``colocated-k``; ``options`` one for all,
        or one each in that order) and wait until every model is loaded. ``shutdown`` kills them."""
        configs = ([("prefill", c) for c in prefill] + [("decode", c) for c in decode]
                   + [("colocated", c) for c in colocated])
        opts = list(options) if isinstance(options, Sequence) else [options] * len(configs)
        if len(opts) != len(configs):
            raise ValueError(f"{len(opts)} ActorOptions for {len(configs)} instances")
        handles = [start_instance(model, c, f"{role}-{n}", dtype=dtype, options=o)
                   for n, ((role, c), o) in enumerate(zip(configs, opts, strict=True))]
        n_p, n_d = len(prefill), len(decode)
        return cls(handles[:n_p], handles[n_p:n_p + n_d], colocated=handles[n_p + n_d:], own_actors=True, **kw)

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def instances(self) -> list[Instance]:
        return [*self.prefills, *self.decodes, *self.colocated]

    @property
    def entries(self) -> list[Instance]:
        """Where new requests go: the prefill instances, or the colocated replicas."""
        return self.prefills or self.colocated

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
                    u.apply(req, inst.clock_offset)
            inst.stats = out.stats
            return out.value
        return out

    def _submit(self, inst: Instance, kind: str, ref: Any, rid: str | None = None, **kw: Any) -> _Call:
        call = _Call(ref, kind, rid, time.monotonic(), **kw)
        inst.calls.append(call)
        return call

    def _fail(self, inst: Instance, why: str) -> None:
        """Mark an instance dead, kill its actor, end every request it held (or was receiving) with ERROR."""
        if not inst.alive:
            return
        inst.error = f"{inst.name}: {why}"
        log.error("instance failed: %s", inst.error)
        try:
            ray.kill(inst.actor, no_restart=True)
        except Exception:  # already gone
            pass
        pending, inst.calls, inst.stepping = inst.calls, [], False
        for c in pending:  # a hand-off into the dead actor: the source still holds the KV; free it there
            self._fail_hand_off(c, inst.error)
        for rid, where in list(self.where.items()):
            if where is inst:
                t = self.transit.pop(rid, None)
                if t is not None:  # the source died mid hand-off: free whatever lands on the target
                    self._drop_on(self._target(t), rid)
                self._fail_request(rid, inst.error)
        inst.ready.clear()

    def _fail_hand_off(self, call: _Call, why: str) -> None:
        """A hand-off (admit_import call) that will not land: free the KV its source holds, fail the request."""
        if call.kind == "admit_import" and self.transit.get(call.rid) is call:
            del self.transit[call.rid]
            self._drop_on(call.src, call.rid)
            self._fail_request(call.rid, why)

    def _target(self, call: _Call) -> Instance | None:
        """The instance an admit_import call was sent to (while its reply is unread)."""
        return next((i for i in self.decodes if call in i.calls), None)

    def _fail_request(self, rid: str, why: str) -> None:
        self.where.pop(rid, None)
        self.transit.pop(rid, None)
        for i in self.prefills:
            i.ready = [(r, kv) for r, kv in i.ready if r != rid]
        req = self.requests.pop(rid, None)
        if req is None:
            return
        req.finish_reason = FinishReason.ERROR
        req.stamp(Event.ABORTED, instance=why.split(":", 1)[0])
        self.failures[rid] = why
        self._outs.append(StepOutput(rid, NO_TOKEN, FinishReason.ERROR))

    def _drop_on(self, inst: Instance | None, rid: str) -> None:
        """Free a request's blocks on an instance (queued behind its earlier calls; no waiting)."""
        if inst is not None and inst.alive:
            self._submit(inst, "abort", inst.actor.abort.remote(rid, FinishReason.ERROR), rid)

    # ---- the engine surface --------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise ValueError if the request could never run here; checked in the driver from each
        instance's limits (no round trip, so a busy actor never delays admission)."""
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        for group, role in ((self.entries, "colocated" if self.colocated else "prefill"), (self.decodes, "decode")):
            live = self.live(group)
            if group and not live:
                raise ClusterError(f"no live {role} instance ({self._why(group)})")
            for i in live:  # the instance's own check, from its limits
                check_fits(request, max_model_len=i.info.max_model_len, block_size=i.info.config.block_size,
                           capacity=i.stats.free_blocks + i.stats.held_blocks, cache=f"{i.name}'s cache")

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.where or rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        self.check_request(request)
        if request.sampling.seed is None:  # fixed here, so the prefill and decode sides sample alike
            request.sampling = dataclasses.replace(request.sampling, seed=self._rng.randrange(2**31))
        live = self.live(self.entries)
        inst = min(live, key=lambda i: (i.stats.queued_tokens, len(i.calls)))
        self.requests[rid] = request
        self.where[rid] = inst
        self._submit(inst, "add", inst.actor.add_request.remote(request), rid)
        inst.kicked = True
        inst.stats = dataclasses.replace(inst.stats, queued_tokens=inst.stats.queued_tokens + request.num_prompt_tokens)

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request now (driver side) and free its blocks wherever they are (sent, not awaited)."""
        inst = self.where.pop(request_id, None)
        if inst is None:
            return False
        req = self.requests.pop(request_id)
        t = self.transit.pop(request_id, None)
        if t is not None:  # mid hand-off: free the target's copy once the import has landed (queued after it)
            dst = self._target(t)
            if dst is not None and dst.alive:
                self._submit(dst, "abort", dst.actor.abort.remote(request_id, reason), request_id)
        for i in self.prefills:
            i.ready = [(r, kv) for r, kv in i.ready if r != request_id]
        if inst.alive:
            self._submit(inst, "abort", inst.actor.abort.remote(request_id, reason), request_id)
        if req.finish_reason is None:
            req.finish_reason = reason
            req.stamp(Event.ABORTED if reason == FinishReason.ABORT else Event.FINISHED, instance=inst.name)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.where) or bool(self._outs)

    def step(self) -> list[StepOutput]:
        """Start a step on every idle actor with work, collect the replies that are in (waiting up to
        ``poll_s`` for the first), hand off prefilled KV, and return the outputs collected."""
        self._kick()
        self._collect(self.poll_s)
        self.pull()
        self._kick()
        outs, self._outs = self._outs, []
        for o in outs:
            if o.finish_reason is not None:
                self.where.pop(o.request_id, None)
                self.requests.pop(o.request_id, None)
        return outs

    def _kick(self) -> None:
        for i in self.live(self.instances):
            if not i.stepping and (i.kicked or i.stats.has_unfinished):
                export = i in self.prefills
                self._submit(i, "step", i.actor.step.remote(export), None)
                i.stepping, i.kicked = True, False

    def _collect(self, timeout: float) -> None:
        """Read every reply that has arrived (per actor in call order), waiting up to ``timeout`` for one."""
        live = [i for i in self.live(self.instances) if i.calls]
        if not live:
            return
        now = time.monotonic()
        for i in live:
            if now - i.calls[0].submitted > self.timeout_s:
                self._fail(i, f"no reply within {self.timeout_s:.0f} s")
        live = [i for i in live if i.alive]
        refs = [c.ref for i in live for c in i.calls]
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done_set = set(done)
        for i in live:
            while i.alive and i.calls and i.calls[0].ref in done_set:
                self._read(i, i.calls.pop(0))

    def _read(self, inst: Instance, call: _Call) -> None:
        try:
            value = self._call(inst, call.ref, time.monotonic() + 1.0)
        except InstanceFailed:  # _fail has ended its requests and the calls still queued on it
            self._fail_hand_off(call, inst.error or f"{inst.name} failed")  # this one was already dequeued
            return
        except Exception as e:
            self._read_error(inst, call, e)
            return
        if call.kind == "step":
            inst.stepping = False
            inst.full = False
            res: StepResult = value
            self._outs += [o for o in res.outputs if o.request_id in self.requests]
            if inst in self.prefills:
                have = {r for r, _ in inst.ready} | set(self.transit)
                inst.ready += [(r, res.exported[r]) for r in res.ready
                               if r in res.exported and r not in have and self.where.get(r) is inst]
        elif call.kind == "admit_import":
            self._landed(inst, call, value)

    def _read_error(self, inst: Instance, call: _Call, e: Exception) -> None:
        if call.kind == "step":  # the engine raised mid-step: its state is unknown
            self._fail(inst, f"step raised {type(e).__name__}: {e}")
        elif call.kind == "add":
            self._fail_request(call.rid, f"{inst.name}: add_request failed: {type(e).__name__}: {e}")
        elif call.kind == "admit_import":
            self._fail_hand_off(call, f"{call.src.name if call.src else '?'}->{inst.name}: transfer of {call.rid} "
                                      f"failed: {type(e).__name__}: {e}")
        else:
            log.warning("%s: %s(%s) failed: %s", inst.name, call.kind, call.rid, e)

    def _landed(self, d: Instance, call: _Call, nbytes: int | None) -> None:
        rid, p = call.rid, call.src
        if self.transit.get(rid) is not call:
            return  # aborted or failed meanwhile (its abort was queued behind this import)
        del self.transit[rid]
        if nbytes is None:  # no room after all: back to the head of the source's queue
            d.full = True
            if p is not None and p.alive and self.where.get(rid) is p:
                p.ready.insert(0, (rid, call.kv))
            return
        self.where[rid] = d
        self.transfer_bytes += nbytes
        self.num_transfers += 1
        if p is not None and p.alive:
            self._submit(p, "release", p.actor.release.remote(rid), rid)

    # ---- KV hand-off ---------------------------------------------------------------------------
    def pull(self) -> int:
        """Hand every prefilled request a decode actor has room for to one (oldest first per prefill
        actor); the import is queued on the decode actor, never awaited. Returns how many were sent."""
        sent = 0
        for p in self.live(self.prefills):
            if not self.live(self.decodes):
                for rid in p.ready_ids:
                    self._drop_on(p, rid)
                    self._fail_request(rid, f"no live decode instance ({self._why(self.decodes)})")
                continue
            while p.ready:
                rid, kv = p.ready[0]
                req = self.requests[rid]
                cands = [d for d in self.live(self.decodes) if not d.full]
                if not cands:
                    break
                d = max(cands, key=lambda i: i.stats.free_blocks)
                need = blocks_needed(req.num_tokens, d.info.config.block_size)
                if d.stats.free_blocks < need:
                    break  # keep FCFS order on this prefill actor; its memory is the queue buffer
                p.ready.pop(0)
                # the decode actor stamps the transfer itself when the call starts (not when sent)
                call = self._submit(d, "admit_import", d.actor.admit_import.remote(req, kv, p.name), rid, src=p, kv=kv)
                self.transit[rid] = call
                d.stats = dataclasses.replace(d.stats, free_blocks=d.stats.free_blocks - need)
                d.kicked = True  # its next step is queued right behind the import
                sent += 1
        return sent

    # ---- introspection and lifecycle -----------------------------------------------------------
    def drain(self, timeout_s: float | None = None) -> None:
        """Read every outstanding reply (tests and shutdown): afterwards no call is in flight."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while any(i.calls for i in self.live(self.instances)) and time.monotonic() < deadline:
            self._collect(0.05)

    def held_blocks(self) -> dict[str, int]:
        """KV blocks in use on each live instance (asked now, after every call already sent)."""
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
