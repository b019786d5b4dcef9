"""``hexplan launch PLAN --ray ADDRESS``: the plan's node executors as Ray actors, the gateway here.

Each plan node's executor (``hexplan node``, the same process as without Ray) is started by one
Ray actor (``NodeExecutor``) pinned to the machine the plan names, found in this order:

1. the Ray node with the custom resource ``hexplan_node:NAME`` (``ray start
   --resources='{"hexplan_node:n0": 1}'``); the actor asks for 0.001 of it, so it follows a
   replacement raylet that carries the same resource;
2. the Ray node whose IP is the host of the node's ``address`` in the plan's cluster section
   (what ``hexplan discover`` writes), when exactly one has it (node affinity by node id);
3. the Ray node whose hostname is NAME (node affinity by node id).

The actor reserves no CPU and, on a node with GPUs, ``max(plan GPU index) + 1`` GPUs (Ray then
sets CUDA_VISIBLE_DEVICES; the plan's indices count the visible ones). It listens on the node's
IP at a port picked free there once, at launch, and kept across restarts, so the gateway finds a
restarted executor where the old one was. Ray restarts a dead actor (``MAX_RESTARTS``); the actor
also exits (and so is restarted) when its ``hexplan node`` process dies. The ``hexplan node``
process and its stage workers die with the actor (lifecycle.py: they watch their parent). The
gateway's monitor (faults.py) sees the pipeline's stages stop answering, moves or parks their
requests, and reloads the pipeline on the restarted executor once it answers.

The internal-API token (``--auth-token-file``, else a fresh random one) reaches the actors in
their runtime_env's environment (HEXPLAN_AUTH_TOKEN), never on a command line; whoever can
read the Ray cluster's actor table can read it, and whoever can submit Ray jobs can run code
on every node anyway. With ``--tls-*`` the same certificate paths must exist on every machine.

``replan`` (``--replan``, replan.py): the gateway watches ``ray.nodes()``; a raylet that joins
gets an executor actor (``start_executor``, pinned the same way) when a new plan uses it, and
the actor of one that left for good is killed (``stop_executor``).

SIGTERM/SIGINT: drain as ``hexplan launch`` does, then stop every actor's executor and kill the
actors for good (no restart). Actors are owned by this process: if it dies, SIGKILL included,
Ray kills them too.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time

from hexplan.errors import SpecError
from hexplan.plan import Plan

from .gateway import Gateway
from .launch import serve_until_stopped, start_serving
from .lifecycle import StopSignals, drain_and_stop, stop_serving
from .wire import TOKEN_ENV, Tls

NODE_RESOURCE = "hexplan_node:"
MAX_RESTARTS = 20            # per actor, for the launch's life
READY_TIMEOUT_S = 180
PORT_FREE_WAIT_S = 15.0


def _port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port_on(host: str) -> int:
    """A port free on ``host`` (run as a Ray task on the node)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeExecutor:
    """The actor body: ``hexplan node --name NAME --listen HOST:PORT`` as a child process."""

    def __init__(self, name: str, host: str, port: int, threads: int | None, tls: tuple | None,
                 checkpoint_root: str):
        from .launch import start_node

        token = os.environ.pop(TOKEN_ENV, None)          # from the runtime_env; the child gets it the same way
        deadline = time.monotonic() + PORT_FREE_WAIT_S    # a restart: the old executor may still be closing
        while _port_in_use(host, port) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.name = name
        self.proc, self.address = start_node(name, host, threads, Tls(*tls) if tls else None, token,
                                             checkpoint_root=checkpoint_root, port=port)
        self.stopping = False
        threading.Thread(target=self._watch, daemon=True, name="node-watch").start()

    def _watch(self) -> None:
        """The executor process died on its own: end this actor so Ray restarts both."""
        self.proc.wait()
        if not self.stopping:
            print(f"hexplan: node {self.name}: executor exited with {self.proc.returncode}; restarting",
                  file=sys.stderr, flush=True)
            os._exit(1)

    def info(self) -> dict:
        import ray
        return {"address": self.address, "pid": os.getpid(), "node_pid": self.proc.pid,
                "ray_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self) -> int | None:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def place(plan: Plan, ray_nodes: list[dict]) -> dict:
    """{plan node name: (Ray node dict, pin)} where pin is "resource" or "node_id";
    SpecError naming the node when no Ray node fits (module docstring)."""
    alive = [n for n in ray_nodes if n.get("Alive", n.get("alive"))]
    addresses = {n["name"]: n.get("address") for n in (plan.cluster or {}).get("nodes", []) if n.get("name")}
    return {name: place_node(name, alive, addresses.get(name) or "") for name in plan_nodes(plan)}


def place_node(name: str, alive: list[dict], addr: str = "") -> tuple[dict, str]:
    """The live Ray node for plan node ``name`` (``addr``: its address in the plan's cluster
    section, if any) and how to pin to it; SpecError when none fits."""
    by_res = [n for n in alive if f"{NODE_RESOURCE}{name}" in (n.get("Resources") or {})]
    if len(by_res) > 1:
        raise SpecError(f"plan node {name}: {len(by_res)} Ray nodes have the resource {NODE_RESOURCE}{name}; "
                        "give it to one", field="--ray")
    if by_res:
        return by_res[0], "resource"
    host = addr.rpartition(":")[0].strip("[]")
    by_ip = [n for n in alive if host and n["NodeManagerAddress"] == host]
    if len(by_ip) == 1:
        return by_ip[0], "node_id"
    by_host = [n for n in alive if n.get("NodeManagerHostname") == name]
    if len(by_host) == 1:
        return by_host[0], "node_id"
    raise SpecError(f"plan node {name}: no Ray node has the resource {NODE_RESOURCE}{name}"
                    + (f", {len(by_ip)} have its address's IP {host}" if host else "")
                    + f" and none is one machine named {name}; start its raylet with "
                    f"--resources='{{\"{NODE_RESOURCE}{name}\": 1}}'", field="--ray")


def plan_nodes(plan: Plan) -> list[str]:
    names = []
    for p in plan.pipelines:
        for s in p.stages:
            if s.node not in names:
                names.append(s.node)
    return names


class RayLaunch:
    """The node executors of ``plan`` as Ray actors on the cluster at ``ray_address``, and the
    gateway in this process; ``close()`` stops all of them (and disconnects from Ray if this
    object connected)."""

    def __init__(self, plan: Plan, checkpoint: str, ray_address: str, listen: str = "127.0.0.1:0",
                 tls: Tls | None = None, dtype: str = "float32", threads: int | None = None,
                 max_batch: int | None = None, prefill_chunk: int | None = None, policy: str = "fcfs",
                 mlfq_quantum_s: float | None = None, interleave: int | None = None, matmul_pieces: int = 1,
                 auth_token: str | None = None, http: str | None = None, served_model_name: str | None = None,
                 chat_template: str | None = None, max_queue: int | None = None, max_restarts: int = MAX_RESTARTS,
                 replan=None, cluster=None, shift_threshold: int | None = None):
        """``replan`` (replan.ReplanOptions): re-plan when Ray's nodes join or leave, on
        ``cluster`` (a hexplan.cluster.Cluster; default the plan's cluster section, else Ray's
        nodes with the default network)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from hexplan.discover import connect

        self.actors: dict = {}
        self.info: dict = {}
        self.server = self.gateway = self.http = self.replanner = None
        self._args = (threads, tls, checkpoint, max_restarts)
        self.auth_token = auth_token or secrets.token_urlsafe(32)
        self.tag = secrets.token_hex(4)
        self._connected = connect(ray_address)
        try:
            placed = place(plan, ray.nodes())
            free = ray.remote(num_cpus=0)(free_port_on)
            gpus_used: dict = {}
            workers: dict = {}
            for p in plan.pipelines:
                for s in p.stages:
                    gpus_used.setdefault(s.node, set()).update(s.gpus)
                    workers[s.node] = workers.get(s.node, 0) + s.tp
            options, hosts = {}, {}
            for name, (rn, pin) in placed.items():
                res = rn.get("Resources") or {}
                opts = {"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": 0,
                        "name": f"hexplan-{self.tag}-{name}", "namespace": "hexplan",
                        "runtime_env": {"env_vars": {TOKEN_ENV: self.auth_token}}}
                if res.get("GPU", 0) and gpus_used.get(name):
                    opts["num_gpus"] = max(gpus_used[name]) + 1
                if pin == "resource":
                    opts["resources"] = {f"{NODE_RESOURCE}{name}": 0.001}
                else:
                    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(rn["NodeID"], soft=False)
                options[name] = opts
                hosts[name] = rn["NodeManagerAddress"]
            task_opts = {n: {k: v for k, v in o.items() if k in ("resources", "scheduling_strategy")}
                         for n, o in options.items()}
            ports = dict(zip(options, ray.get([free.options(**task_opts[n]).remote(hosts[n]) for n in options],
                                              timeout=READY_TIMEOUT_S)))
            tls_args = (tls.cert, tls.key, tls.ca) if tls and tls.enabled else None
            cls = ray.remote(NodeExecutor)
            for name in options:
                cpus = (placed[name][0].get("Resources") or {}).get("CPU", 1)
                t = threads or max(1, int(cpus) // max(1, workers.get(name, 1)))
                self.actors[name] = cls.options(**options[name]).remote(name, hosts[name], ports[name], t, tls_args,
                                                                          checkpoint)
            infos = ray.get([a.info.remote() for a in self.actors.values()], timeout=READY_TIMEOUT_S)
            self.info = dict(zip(self.actors, infos))
            self.nodes = {n: i["address"] for n, i in self.info.items()}
            self.gateway = Gateway(plan, checkpoint, self.nodes, tls, dtype, max_batch=max_batch,
                                   prefill_chunk=prefill_chunk, policy=policy, mlfq_quantum_s=mlfq_quantum_s,
                                   interleave=interleave, matmul_pieces=matmul_pieces, auth_token=self.auth_token,
                                   shift_threshold=shift_threshold)
            self.server, self.port, self.http = start_serving(self.gateway, checkpoint, listen, tls, http,
                                                              served_model_name, chat_template, max_queue)
            self.address = f"{listen.rpartition(':')[0] or '127.0.0.1'}:{self.port}"
            if replan is not None:
                self.start_replanner(replan, cluster)
        except BaseException as e:
            self.close()
            if type(e).__module__.startswith("ray"):
                raise RuntimeError(f"--ray: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
            raise

    def start_replanner(self, options, cluster=None) -> None:
        """Watch Ray's nodes and re-plan as they join and leave (replan.py)."""
        from hexplan.plan import plan_cluster

        from .replan import RayNodes, Replanner, cluster_from_ray
        source = RayNodes()
        if cluster is None:
            try:
                cluster = plan_cluster(self.gateway.plan)
            except SpecError:
                cluster = cluster_from_ray(source.poll())
        self.replanner = Replanner(self.gateway, cluster, source, options, provision=_RayExecutors(self))
        self.replanner.start()

    def start_executor(self, name: str) -> str:
        """An executor actor on the Ray node that joined as ``name`` (pinned as at launch, all its
        GPUs); returns its address."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        threads, tls, checkpoint, max_restarts = self._args
        if name in self.actors:
            return self.info[name]["address"]
        alive = [n for n in ray.nodes() if n.get("Alive", n.get("alive"))]
        rn, pin = place_node(name, alive)
        res = rn.get("Resources") or {}
        opts = {"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": 0,
                "name": f"hexplan-{self.tag}-{name}", "namespace": "hexplan",
                "runtime_env": {"env_vars": {TOKEN_ENV: self.auth_token}}}
        if res.get("GPU", 0):
            opts["num_gpus"] = int(res["GPU"])
        if pin == "resource":
            opts["resources"] = {f"{NODE_RESOURCE}{name}": 0.001}
        else:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(rn["NodeID"], soft=False)
        task_opts = {k: v for k, v in opts.items() if k in ("resources", "scheduling_strategy")}
        host = rn["NodeManagerAddress"]
        port = ray.get(ray.remote(num_cpus=0)(free_port_on).options(**task_opts).remote(host), timeout=READY_TIMEOUT_S)
        tls_args = (tls.cert, tls.key, tls.ca) if tls and tls.enabled else None
        t = threads or max(1, int(res.get("CPU", 1)))
        actor = ray.remote(NodeExecutor).options(**opts).remote(name, host, port, t, tls_args, checkpoint)
        info = ray.get(actor.info.remote(), timeout=READY_TIMEOUT_S)
        self.actors[name], self.info[name] = actor, info
        return info["address"]

    def stop_executor(self, name: str) -> None:
        """Kill node ``name``'s actor for good (its node left the cluster)."""
        import ray
        actor = self.actors.pop(name, None)
        self.info.pop(name, None)
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass

    def kill_node(self, name: str) -> None:
        """Kill node ``name``'s actor (Ray restarts it); for tests and benchmarks."""
        import ray
        ray.kill(self.actors[name], no_restart=False)

    def drain(self, timeout: float, err=None, hurry=None) -> int:
        if self.server is None or self.gateway is None:
            return 0
        return drain_and_stop(self.gateway, self.server, timeout, err, hurry, http=self.http)

    def close(self) -> None:
        import ray

        stop_serving(self.http, self.server, self.gateway)
        if self.replanner is not None:
            self.replanner.stop()
        stops = []
        for a in list(self.actors.values()):
            try:
                stops.append(a.stop.remote())
            except Exception:
                pass
        try:
            ray.wait(stops, num_returns=len(stops), timeout=20)
        except Exception:
            pass
        for a in list(self.actors.values()):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = {}
        if self._connected:
            self._connected = False
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RayExecutors:
    """The re-planner's provisioner on Ray: an executor for a node that joined, none for one that left."""

    def __init__(self, launch: RayLaunch):
        self.launch = launch

    def start(self, name: str) -> str:
        return self.launch.start_executor(name)

    def stop(self, name: str) -> None:
        self.launch.stop_executor(name)


def run_launch_ray(plan: Plan, checkpoint: str, ray_address: str, listen: str, tls: Tls | None, dtype: str,
                   threads: int | None, out=sys.stdout, drain_timeout: float = 30.0,
                   stall_timeout_s: float | None = None, recovery_wait_s: float | None = None, **kwargs) -> int:
    import ray

    from hexplan.discover import connect

    # Join Ray first: ray.init installs a SIGTERM handler of its own (exit at once), which ours replaces.
    connected = connect(ray_address)
    signals = StopSignals()
    try:
        launch = RayLaunch(plan, checkpoint, ray_address, listen, tls, dtype, threads, **kwargs)
    except BaseException:
        if connected:
            ray.shutdown()
        raise
    launch._connected = connected          # close() disconnects
    where = ", ".join(f"{n}@{i['address']}" for n, i in launch.info.items())
    return serve_until_stopped(launch, signals, f"{len(launch.actors)} node executor(s) on Ray: {where}", out,
                               drain_timeout, stall_timeout_s, recovery_wait_s)
