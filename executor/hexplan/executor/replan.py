"""Re-plan on cluster change, with no restart (``hexplan serve --replan``, ``hexplan launch --ray --replan``).

One thread (``Replanner``) watches which machines are there: Ray's node list (``RayNodes``:
``ray.nodes()``, polled every ``poll_s``) or, without Ray, the node executors of the cluster file
(``ProbedNodes``: their grpc health service). A node joins when it shows up; it leaves for good
when it has been missing for ``grace_s`` (a restarted executor comes back sooner, and the
gateway's own fault handling, faults.py, covers that). On a change:

1. Solve: the planner (hexplan.solver ``solve``) on the cluster restricted to the nodes there
   (``SolveOptions.nodes``), at the plan's workload and cost parameters, within ``time_limit_s``,
   warm-started from the live pipelines (``SolveOptions.start``: those whose nodes are all still
   there seed the search, which returns nothing worse than them in the solver's terms). The floor
   is also applied here: the current plan's pipelines that survive the change, evaluated by the
   same cost model (hexplan.evaluate) on the same cluster.
2. Decide: switch when the new plan predicts at least ``1 + margin`` times the survivors'
   throughput, or when the current plan lost a pipeline (then the better of the new plan and the
   survivors). Otherwise keep serving as is.
3. Load, while the current pipelines keep serving: a pipeline of the new plan identical to a live
   one (same nodes, GPUs, TP degrees, layers) is kept as is; the others are loaded with stage ids
   of a new generation (``loading.stage_id``: ``g{G}p{P}s{S}``), so the old and new shards of one
   node live side by side. (On GPUs both must fit in memory at once; a load that fails abandons
   the re-plan and the current plan keeps serving.)
4. Switch (under the gateway's lock, no I/O): the new pipelines' scheduler pipes join the
   gateway's scheduler (appended: indices only grow), routing weights become the new plan's and
   0 for the pipelines it does not keep (they take no new request), requests parked for want of
   a live pipeline go to the new ones.
5. Drain: a replaced pipeline ("draining") finishes the requests it holds. A request stays on the
   pipeline it started on: its KV cache is there, so it costs nothing extra and its tokens come
   from the same weights. (Moving it would mean prefilling prompt + tokens so far again elsewhere,
   as failover does; that is what happens only to the requests of a pipeline still busy after
   ``drain_timeout_s``, and to those of a pipeline whose node is gone.) Once empty, a pipeline is
   retired (its loops end) and its shards are unloaded (``UnloadShard``).

Each change is one line (logger ``hexplan.replan``, INFO, which the CLI writes to stderr; also
printed to ``err`` when given): old and new predicted throughput, solve, load and switch times. ``Replanner.events`` keeps them (the bench
reads them).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

import grpc

from hexplan.cluster import Cluster, Node
from hexplan.errors import HexplanError, SpecError
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.plan import Plan
from hexplan.serving.setup import choose_batch, pipeline_step_ms
from hexplan.validate import plan_assumptions

from ._proto import hexplan_v1_pb2 as pb
from .faults import PROBE_TIMEOUT_S, _answers
from .gateway import Pipeline, build_scheduler
from .loading import GatewayError, load_shards, stage_id

log = logging.getLogger("hexplan.replan")

UNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplanOptions:
    poll_s: float = 2.0           # how often the node list is read
    grace_s: float = 10.0         # a node missing this long has left for good
    time_limit_s: float = 10.0    # the solver's time limit
    margin: float = 0.05          # switch when the new plan predicts >= (1 + margin) x the current one
    drain_timeout_s: float = 120.0   # then a replaced pipeline's requests move (prefilled again)
    retry_s: float = 10.0         # a failed re-plan after a lost pipeline is tried again this often
    solver: str = "highs"         # hexplan solve --solver

    def check(self) -> None:
        for name in ("poll_s", "time_limit_s", "retry_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise SpecError(f"must be a positive number of seconds, got {v!r}", field=name)
        for name in ("grace_s", "drain_timeout_s", "margin"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise SpecError(f"must be a number >= 0, got {v!r}", field=name)


@dataclass
class ReplanEvent:
    """One re-plan: what triggered it, what was decided, how long each part took (monotonic s)."""
    reason: str
    t_change: float              # when the change was first seen (a leave: first poll it was missing)
    t_detect: float = 0.0        # when the re-plan began (a leave: t_change + grace)
    solve_s: float = 0.0
    load_s: float = 0.0
    switch_s: float = 0.0
    drain_s: float | None = None  # set once the replaced pipelines are retired
    old_tps: float = 0.0
    new_tps: float = 0.0
    switched: bool = False
    generation: int = 0
    kept: int = 0                # pipelines of the new plan that were already loaded
    loaded: int = 0
    replaced: int = 0            # pipelines drained and retired
    moved: int = 0               # requests moved off a pipeline that did not drain in time
    t_switched: float = 0.0
    error: str = ""


class RayNodes:
    """The live nodes of the Ray cluster this process is connected to: {name: RayNode}
    (hexplan.discover.read_nodes: named by their ``hexplan_node:NAME`` resource, else hostname)."""

    def __init__(self, default_gpu_type: str = "cpu", cpu_workers: int = 1):
        self.default_gpu_type, self.cpu_workers = default_gpu_type, cpu_workers

    def poll(self) -> dict:
        import ray

        from hexplan.discover import read_nodes
        return {r.name: r for r in read_nodes(ray.nodes(), self.default_gpu_type, self.cpu_workers)}


class ProbedNodes:
    """Without Ray: the nodes of ``addresses`` ({name: HOST:PORT}) whose executor answers its
    health service. A node of the cluster file that starts answering joins; one silent for the
    grace period leaves."""

    def __init__(self, gw, addresses: dict):
        self.gw, self.addresses = gw, dict(addresses)

    def poll(self) -> dict:
        return {n: None for n, a in self.addresses.items() if _answers(self.gw, a)}


def pipeline_key(p) -> tuple:
    """What makes two plan pipelines the same shards: nodes, GPUs, TP degrees, layers."""
    return tuple((s.node, tuple(s.gpus), s.tp, tuple(s.layers), getattr(s, "shift_sp", 1)) for s in p.stages)


def node_from_ray(rn, cluster: Cluster) -> Node | None:
    """A cluster Node for a Ray node not in the cluster file: its GPU type (the cluster's own
    definition of it when it has one, else the catalog's) and count; its links are the cluster's
    default (not measured: run ``hexplan discover`` for that)."""
    from hexplan.gpus import CATALOG

    gpu = next((n.gpu for n in cluster.nodes if n.gpu.name == rn.gpu), None) or CATALOG.get(rn.gpu)
    if gpu is None:
        return None
    return Node(rn.name, gpu, rn.count, interconnect=gpu.interconnect, address=f"{rn.ip}:{rn.port}")


def cluster_from_ray(nodes: dict, name: str = "ray") -> Cluster:
    """A cluster of Ray's nodes ({name: RayNode}) with the default network, for a plan that
    records none (``--cluster`` gives a measured one)."""
    empty = Cluster(name, ())
    out = [node_from_ray(rn, empty) for rn in nodes.values()]
    return Cluster(name, tuple(n for n in out if n is not None))


class Replanner:
    """Watches ``source`` (RayNodes or ProbedNodes) and re-plans the gateway ``gw`` on
    ``cluster`` when nodes join or leave (module docstring). ``provision``: for Ray, an object with
    ``start(name) -> address`` (an executor on a node that joined) and ``stop(name)``;
    without it, a joined node's address is the cluster file's. Each change's line is logged
    (logger ``hexplan.replan``, INFO: the CLI's stderr) and, when ``err`` is a stream, also
    printed there (``hexplan: re-plan ...``)."""

    def __init__(self, gw, cluster: Cluster, source, options: ReplanOptions = ReplanOptions(), provision=None,
                 err=None):
        options.check()
        self.gw, self.cluster, self.source, self.options = gw, cluster, source, options
        self.provision, self.err = provision, err
        asm = plan_assumptions(gw.plan)
        self.model, self.workload, self.params = gw.plan.model, asm.workload, asm.params
        self.costs = CostCache(self.model, self.workload, self.params)
        self.generation = 0
        self.members: set = set()
        self.absent_since: dict = {}
        self._unknown: set = set()       # nodes seen with a GPU type nobody knows (warned once)
        self.events: list[ReplanEvent] = []
        self.retry_at: float | None = None
        self.lock = threading.Lock()      # one re-plan at a time (the thread, or a direct call)
        self._thread: threading.Thread | None = None
        self._drains: list[threading.Thread] = []
        with gw.cv:                        # the first plan's pipelines know where they came from
            for p in gw.pipelines:
                if p.plan is None:
                    p.plan, p.plan_index = gw.plan, p.index
        for n in {s.node for p in gw.plan.pipelines for s in p.stages}:
            self.members.add(n)

    # ---- watching ---------------------------------------------------------------------------
    def start(self) -> None:
        """Read the node list once (nodes there now are members), then watch from a thread."""
        present = self.source.poll()
        for name, info in present.items():
            if self._know(name, info):
                self.members.add(name)
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway-replan")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the watch thread (it ends with the gateway: ``gw.stop``)."""
        for t in [self._thread] + self._drains:
            if t is not None:
                t.join(timeout=timeout)

    def _run(self) -> None:
        while not self.gw.stop_event.wait(self.options.poll_s):
            try:
                self.tick()
            except Exception:          # the watcher must outlive a bad poll
                log.exception("re-plan: watching the cluster failed")

    def _know(self, name: str, info) -> bool:
        """Whether node ``name`` can be planned on: in the cluster, or a Ray node of a known type
        (added to the cluster)."""
        if any(n.name == name for n in self.cluster.nodes):
            return True
        node = node_from_ray(info, self.cluster) if info is not None else None
        if node is None:
            if name not in self._unknown:          # once, not every poll
                self._unknown.add(name)
                log.warning("re-plan: node %s joined but its GPU type %r is not known; not planned on (label "
                            "it hexplan_gpu_type, docs/ray.md)", name, getattr(info, "gpu", None))
            return False
        self.cluster = self.cluster.with_nodes(list(self.cluster.nodes) + [node])
        return True

    def tick(self) -> ReplanEvent | None:
        """One poll: re-plan when a node joined or left for good (or a failed re-plan is due
        again). Returns the re-plan's event, if any."""
        now = time.monotonic()
        present = self.source.poll()
        for name in present:
            self.absent_since.pop(name, None)
        joined = sorted(n for n in present if n not in self.members and self._know(n, present[n]))
        left, first_seen = [], now
        for n in sorted(self.members - set(present)):
            since = self.absent_since.setdefault(n, now)
            if now - since >= self.options.grace_s:
                left.append(n)
                first_seen = min(first_seen, since)
        if not (joined or left):
            if self.retry_at is not None and now >= self.retry_at:
                return self.replan("retry after a failed re-plan", now)
            return None
        self.members.update(joined)
        self.members.difference_update(left)
        for n in left:
            self.absent_since.pop(n, None)
            if self.provision is not None:      # its executor went with it: a new one if it comes back
                self.gw.node_addresses.pop(n, None)
                try:
                    self.provision.stop(n)
                except Exception as e:
                    log.warning("re-plan: stopping node %s's executor: %s", n, e)
        reason = "; ".join(x for x in (f"joined: {', '.join(joined)}" if joined else "",
                                       f"left: {', '.join(left)}" if left else "") if x)
        return self.replan(reason, first_seen)

    # ---- the re-plan --------------------------------------------------------------------------
    def predict(self, pipelines) -> float:
        """Predicted output tokens/s of these plan pipelines on the cluster (the cost model)."""
        pipelines = list(pipelines)
        if not pipelines:
            return 0.0
        try:
            return sum(m.throughput for m in evaluate_plan_pipelines(self.cluster, self.costs, pipelines))
        except (SpecError, KeyError, ValueError):
            return sum(p.throughput_tokens_per_s or 0.0 for p in pipelines)

    def solve(self) -> Plan | None:
        """The planner on the nodes there, warm-started from the live pipelines (those on nodes
        still there seed its search: ``SolveOptions.start``)."""
        from hexplan.solver import SolveOptions, solve

        gw = self.gw
        with gw.cv:
            live = [p.plan.pipelines[p.plan_index] for p in gw.pipelines if not p.retiring and p.state != "retired"]
        opts = SolveOptions(time_limit=self.options.time_limit_s, backend=self.options.solver,
                            workload=self.workload, params=self.params,
                            nodes=tuple(sorted(n for n in self.members if any(m.name == n for m in self.cluster.nodes))),
                            start=tuple(tuple((s.node, s.tp) for s in pl.stages) for pl in live))
        try:
            return solve(self.cluster, self.model, opts)
        except HexplanError as e:        # infeasible on what is left, ...
            log.warning("re-plan: no plan on %s: %s", ", ".join(opts.nodes) or "no node", e)
            return None

    def replan(self, reason: str, t_change: float | None = None, plan: Plan | None = None) -> ReplanEvent:
        """Solve (or take ``plan``), decide, and switch if it pays (module docstring)."""
        with self.lock:
            now = time.monotonic()
            ev = ReplanEvent(reason, now if t_change is None else t_change, t_detect=now)
            self.events.append(ev)
            self.retry_at = None
            gw = self.gw
            with gw.cv:
                current = [p for p in gw.pipelines if not p.retiring and p.state != "retired"]
                # lost: on a node that left. One down on nodes still there is recovering (faults.py
                # reloads it when they answer): it counts, and a plan that keeps it keeps it.
                lost = [p for p in current if any(n not in self.members for n in p.nodes)]
                survivors = [p for p in current if p not in lost]
            spec = {id(p): p.plan.pipelines[p.plan_index] for p in current}
            ev.old_tps = self.predict(spec[id(p)] for p in survivors)
            if plan is None:
                t0 = time.monotonic()
                plan = self.solve()
                ev.solve_s = time.monotonic() - t0
            ev.new_tps = self.predict(plan.pipelines) if plan is not None else 0.0
            if lost and (plan is None or ev.new_tps < ev.old_tps):
                if not survivors:
                    ev.error = "no plan on the nodes left" if plan is None else ev.error
                    self.retry_at = time.monotonic() + self.options.retry_s
                    self._say(ev, "failed: " + (ev.error or "no plan"))
                    return ev
                # the floor: the current plan without its lost pipelines
                plan = replace(gw.plan, pipelines=tuple(spec[id(p)] for p in survivors))
                ev.new_tps = ev.old_tps
            elif not lost and (plan is None or ev.new_tps < ev.old_tps * (1 + self.options.margin)):
                self._say(ev, f"kept the current plan (the new one predicts {ev.new_tps:.1f} tokens/s, "
                              f"below {1 + self.options.margin:g} x {ev.old_tps:.1f})" if plan is not None
                          else "kept the current plan (no new plan)")
                return ev
            self.switch(plan, ev)
            return ev

    def switch(self, plan: Plan, ev: ReplanEvent) -> None:
        """Load what ``plan`` needs, switch routing to it, drain the rest (module docstring 3-5)."""
        gw = self.gw
        with gw.cv:
            live = {}
            for p in gw.pipelines:
                if not p.retiring and p.state != "retired" and all(n in self.members for n in p.nodes):
                    live.setdefault(pipeline_key(p.plan.pipelines[p.plan_index]), []).append(p)
        kept, to_load = {}, []
        for j, pp in enumerate(plan.pipelines):
            same = live.get(pipeline_key(pp))
            if same:
                kept[j] = same.pop(0)
            else:
                to_load.append(j)
        gen = self.generation + 1 if to_load else self.generation
        t0 = time.monotonic()
        addresses, timings = {}, {}
        if to_load:
            try:
                for n in sorted({s.node for j in to_load for s in plan.pipelines[j].stages}):
                    if n not in gw.node_addresses:
                        gw.node_addresses[n] = self._address(n)
                calibrate = None
                if gw.calibrate:
                    from hexplan.serving.setup import CALIBRATION_BATCHES
                    context = max(1, min(int(self.workload.mean_decode_context), gw.context_limit - 1))
                    calibrate = (CALIBRATION_BATCHES, context)
                addresses = load_shards(plan, gw.checkpoint, gw.dtype, gw.node_addresses, gw.stub,
                                        getattr(gw, "load_step_tokens", 0), calibrate, timings, pipelines=to_load,
                                        generation=gen, shift_threshold=getattr(gw, "shift_threshold", None))
            except (GatewayError, HexplanError, KeyError, RuntimeError) as e:
                ev.error = f"loading the new plan failed: {e}"
                self._unload([(n, stage_id(j, si, gen)) for j in to_load
                              for si, n in enumerate(s.node for s in plan.pipelines[j].stages)])
                ev.load_s = time.monotonic() - t0
                if any(n not in self.members for p in gw.pipelines if not p.retiring and p.state != "retired"
                       for n in p.nodes):
                    self.retry_at = time.monotonic() + self.options.retry_s
                self._say(ev, "failed: " + ev.error)
                return
            self.generation = gen
        ev.load_s = time.monotonic() - t0
        ev.generation = self.generation
        tmp = build_scheduler(plan, gw.policy, **gw._schedule_args)
        if to_load and gw.calibrate and timings:
            batches = []
            for j, pp in enumerate(plan.pipelines):
                b = choose_batch(pipeline_step_ms([timings.get((j, si), {}) for si in range(len(pp.stages))]))
                batches.append(b if b is not None else tmp.configs[j].batch)
            predicted = tmp.predicted_tokens_per_s
            tmp = build_scheduler(plan, gw.policy, **dict(gw._schedule_args, batches=batches))
            tmp.predicted_tokens_per_s = predicted
        t1 = time.monotonic()
        added = []
        with gw.cv:
            sched = gw.scheduler
            where = {j: p.index for j, p in kept.items()}
            predicted = list(getattr(sched, "predicted_tokens_per_s", None) or [None] * len(sched.pipes))
            for j in to_load:
                gi = len(sched.pipes)
                pipe = tmp.pipes[j]
                pipe.index = gi
                sched.pipes.append(pipe)
                sched.configs.append(tmp.configs[j])
                pp = plan.pipelines[j]
                gw.pipelines.append(Pipeline(gi, pp.weight or 0.0, [addresses[j, si] for si in range(len(pp.stages))],
                                             [s.node for s in pp.stages], plan=plan, plan_index=j, generation=gen))
                where[j] = gi
                added.append(gi)
                predicted.append(tmp.predicted_tokens_per_s[j] if tmp.predicted_tokens_per_s else None)
            # routing: the new plan's rates and latencies; 0 (never chosen) for the rest
            disp = tmp.dispatcher
            rates, lat = [0.0] * len(sched.pipes), [0.0] * len(sched.pipes)
            for j, gi in where.items():
                rates[gi], lat[gi] = disp.rates[j], disp.latencies[j]
            if not any(rates[gi] > 0 for gi in where.values()):   # no weights: share equally
                for gi in where.values():
                    rates[gi] = 1.0
            disp.rates, disp.latencies = rates, lat
            sched.dispatcher = disp
            sched.predicted_tokens_per_s = predicted
            if gw.metrics is not None:
                gw.metrics.predicted = list(predicted)
            keep = set(where.values())
            for p in gw.pipelines:
                if p.index not in keep and not p.retiring and p.state != "retired":
                    p.retiring = True
                    ev.replaced += 1
                    if p.alive:
                        p.state = "draining"
            gw.plan = plan
            gw.resume_parked_locked()
            gw.set_health()
            gw.cv.notify_all()
        for gi in added:
            gw.start_loops(gi)
        now = time.monotonic()
        ev.switch_s, ev.t_switched, ev.switched = now - t1, now, True
        ev.kept, ev.loaded = len(kept), len(to_load)
        self._say(ev, None)
        t = threading.Thread(target=self._drain, args=(ev,), daemon=True, name="gateway-replan-drain")
        self._drains = [d for d in self._drains if d.is_alive()] + [t]
        t.start()

    def _address(self, name: str) -> str:
        """A node the new plan uses that has no executor address yet (it joined)."""
        if self.provision is not None:
            return self.provision.start(name)
        node = next((n for n in self.cluster.nodes if n.name == name), None)
        if node is None or not node.address:
            raise GatewayError(f"node {name}: no executor address (give it in the cluster file)")
        return node.address

    def _drain(self, ev: ReplanEvent) -> None:
        """Retire the replaced pipelines once empty (or after drain_timeout_s, moving what they
        hold), then unload their shards."""
        gw = self.gw
        deadline = time.monotonic() + self.options.drain_timeout_s
        retired = []
        while True:
            with gw.cv:
                pending = [p for p in gw.pipelines if p.retiring and p.state != "retired"]
                late = time.monotonic() >= deadline
                for p in pending:
                    pipe = gw.scheduler.pipes[p.index]
                    if not p.alive or (pipe.n_sys == 0 and not pipe.release) or late or gw.stop_event.is_set():
                        moved = self._retire_locked(p)
                        ev.moved += len(moved)
                        retired.append((p, moved))
                gw.set_health()
                gw.cv.notify_all()
                if all(p.state == "retired" for p in pending):
                    break
            if gw.stop_event.wait(0.05):
                continue
        stages = []
        for p, moved in retired:
            if moved and p.stages:           # their KV on the old stages (about to be unloaded anyway)
                try:
                    gw.stub(p.stages[0]).Release(pb.ReleaseRequest(request_ids=[r.id for r in moved]),
                                                 timeout=PROBE_TIMEOUT_S)
                except grpc.RpcError:
                    pass
            stages += [(n, stage_id(p.plan_index, si, p.generation)) for si, n in enumerate(p.nodes)]
        self._unload(stages)
        ev.drain_s = time.monotonic() - ev.t_switched
        log.info("re-plan %d: %d replaced pipeline(s) drained in %.2f s (%d request(s) moved), %d stage(s) unloaded",
                 ev.generation, len(retired), ev.drain_s, ev.moved, len(stages))

    def _retire_locked(self, p) -> list:
        """Stop pipeline ``p`` for good (its loops end); requests it still holds move to the
        current pipelines, prefilled again there from prompt + tokens so far."""
        gw = self.gw
        p.alive, p.state = False, "retired"
        p.reason = "replaced by a re-plan"
        p.epoch += 1
        moved = []
        if gw.scheduler.pipes[p.index].alive:
            sids = gw.scheduler.fail(p.index)
            moved = [gw.requests[s] for s in sids if s in gw.requests]
            gw.requeue_locked(sids)
        return moved

    def _unload(self, stages) -> None:
        """UnloadShard each (node, stage id) whose node is still a member (a gone one took its
        shards with it)."""
        gw = self.gw
        for node, sid in stages:
            addr = gw.node_addresses.get(node)
            if not addr or node not in self.members:
                continue
            try:
                gw.stub(addr).UnloadShard(pb.UnloadShardRequest(stage_id=sid), timeout=UNLOAD_TIMEOUT_S)
            except grpc.RpcError as e:
                log.warning("re-plan: unloading stage %s on node %s failed: %s", sid, node, e.code().name)

    def _say(self, ev: ReplanEvent, outcome: str | None) -> None:
        """The change's one line: stderr and the log."""
        if outcome is None:
            gain = (f"{(ev.new_tps / ev.old_tps - 1) * 100:+.1f}%" if ev.old_tps > 0
                    else "no pipeline of the current plan was left")
            outcome = (f"switched to generation {ev.generation}: predicted {ev.old_tps:.1f} -> {ev.new_tps:.1f} "
                       f"tokens/s ({gain}); solve {ev.solve_s:.2f} s, load {ev.load_s:.2f} s, "
                       f"switch {ev.switch_s * 1e3:.1f} ms; {ev.kept} pipeline(s) kept, {ev.loaded} loaded, "
                       f"{ev.replaced} draining")
        else:
            outcome += f"; predicted {ev.old_tps:.1f} tokens/s now; solve {ev.solve_s:.2f} s, load {ev.load_s:.2f} s"
        line = f"re-plan ({ev.reason}): {outcome}"
        log.info("%s", line, extra={"replan": {"reason": ev.reason, "old_tokens_per_s": round(ev.old_tps, 3),
                                               "new_tokens_per_s": round(ev.new_tps, 3),
                                               "solve_s": round(ev.solve_s, 4), "load_s": round(ev.load_s, 4),
                                               "switch_s": round(ev.switch_s, 6), "switched": ev.switched}})
        if self.err is not None:
            print(f"hexplan: {line}", file=self.err, flush=True)
