"""``hexplan discover --ray ADDRESS``: a cluster spec (docs/cluster-format.md) from a running Ray cluster.

Needs the ``[ray]`` extra; neither torch nor grpc. The planner never imports this module.

What it reads, per live Ray node (``ray.nodes()``):

- name: the node's custom resource ``hexplan_node:NAME`` when it has one (``hexplan launch
  --ray`` pins the plan's node NAME there), else its hostname (made unique, ``-2``, ``-3``...).
- GPU type: the node label ``hexplan_gpu_type`` (``ray start --labels='{"hexplan_gpu_type":
  "A100-80G"}'``), else a custom resource ``hexplan_gpu_type:TYPE``, else Ray's
  ``accelerator_type:T`` resource mapped to the catalog (``ray_gpu_type``). A node Ray cannot
  type (no GPU, or a type the catalog does not know) is written with ``--default-gpu-type``
  (default ``cpu``: one CPU worker of the executor) and a ``FILL IN`` comment.
- GPU count: its ``GPU`` resource (a node with none: ``--cpu-workers``, default 1, of type cpu).
- address: the node's IP (``NodeManagerAddress``) and port 50061 (``hexplan node``'s default;
  nodes sharing an IP get 50062, 50063...).
- RAM and CPUs, the Ray node id: comments.

Links: one probe actor per node (no CPU reserved, pinned with NodeAffinitySchedulingStrategy)
listens on a TCP port of the node's IP. For every pair, the first node's actor times a
ping-pong (``PINGS`` one-byte round trips; latency = half the median round trip) and a
transfer of ``--probe-mb`` MB to the other (best of two; bandwidth = bytes / time to the
receiver's acknowledgement, so a slow start on a long fat link reads low). Each probe is bounded
by ``--probe-timeout``. Links are taken as symmetric (one direction measured).

Regions: nodes joined by a link of one-way latency under ``--region-latency-ms`` (default 2 ms)
are one region (single linkage). With one group only, no region is written.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field

from .errors import HexplanError, SpecError
from .gpus import CATALOG, catalog_name_for_device

NODE_PORT = 50061            # `hexplan node --listen` default
PINGS = 20
GPU_LABEL = "hexplan_gpu_type"
NODE_RESOURCE = "hexplan_node:"


def ray_gpu_type(ray_type: str) -> str | None:
    """The catalog name of Ray's ``accelerator_type`` (None: unknown or ambiguous, e.g. plain
    ``A100``, sold with 40 and 80 GB)."""
    for name in CATALOG:
        if name.lower() == ray_type.lower():
            return name
    if ray_type.upper() == "H100":
        return "H100-80G"       # Ray says H100 for every H100; the catalog's is the SXM part
    if ray_type.upper() in ("A100", "V100"):
        return None
    return catalog_name_for_device(ray_type.replace("-", " "))


@dataclass
class RayNode:
    node_id: str
    ip: str
    hostname: str
    cpus: float
    gpus: int
    memory: float
    head: bool
    name: str = ""
    gpu: str = ""
    count: int = 1
    port: int = NODE_PORT
    note: str = ""               # why the GPU type must be filled in ("" when Ray typed it)
    ray_type: str = ""
    named_by_resource: bool = False
    labels: dict = field(default_factory=dict)


def read_nodes(nodes: list[dict], default_gpu_type: str = "cpu", cpu_workers: int = 1) -> list[RayNode]:
    """The live nodes of ``ray.nodes()``, named and typed (see the module docstring)."""
    out = []
    for n in nodes:
        if not n.get("Alive", n.get("alive")):
            continue
        res = n.get("Resources") or {}
        labels = n.get("Labels") or {}
        rn = RayNode(node_id=n["NodeID"], ip=n["NodeManagerAddress"], hostname=n.get("NodeManagerHostname") or "node",
                     cpus=float(res.get("CPU", 0)), gpus=int(res.get("GPU", 0)), memory=float(res.get("memory", 0)),
                     head="node:__internal_head__" in res, labels=dict(labels))
        named = sorted(k[len(NODE_RESOURCE):] for k in res if k.startswith(NODE_RESOURCE))
        if named:
            rn.name, rn.named_by_resource = named[0], True
        typed = labels.get(GPU_LABEL) or next((k.split(":", 1)[1] for k in sorted(res)
                                               if k.startswith(GPU_LABEL + ":")), None)
        accel = [k.split(":", 1)[1] for k in sorted(res) if k.startswith("accelerator_type:")]
        rn.ray_type = ", ".join(accel)
        if typed:
            rn.gpu = typed
            rn.count = rn.gpus or cpu_workers
        elif rn.gpus:
            known = [t for t in (ray_gpu_type(a) for a in accel) if t]
            rn.count = rn.gpus
            if known:
                rn.gpu = known[-1]          # A100 and A100-80G both present: the specific one
            else:
                rn.gpu = default_gpu_type
                why = (f"Ray's accelerator type {rn.ray_type} is not a built-in type (or is ambiguous)" if accel
                       else "Ray reports no accelerator type")
                rn.note = f"FILL IN the GPU type: {why} for its {rn.gpus} GPU(s); written as {default_gpu_type}"
        else:
            rn.gpu, rn.count = default_gpu_type, cpu_workers
            rn.note = (f"FILL IN the GPU type if this machine has GPUs: Ray reports none; written as {cpu_workers} "
                       f"{default_gpu_type} worker(s)")
        out.append(rn)
    out.sort(key=lambda r: (not r.head, r.name or "~", r.ip, r.node_id))
    taken = {r.name for r in out if r.name}
    for r in out:
        if not r.name:
            base = re.sub(r"[^A-Za-z0-9._-]+", "-", r.hostname).strip("-") or "node"
            name, i = base, 1
            while name in taken:
                i += 1
                name = f"{base}-{i}"
            r.name = name
            taken.add(name)
    ports: dict = {}
    for r in out:
        r.port = NODE_PORT + ports.get(r.ip, 0)
        ports[r.ip] = ports.get(r.ip, 0) + 1
    return out


# ---- probing ----------------------------------------------------------------------------------

def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


class Probe:
    """A probe actor's body: a TCP server on ``host`` (ping echo, sink with acknowledgement)
    and the client side of one pair's measurement."""

    def __init__(self, host: str, timeout: float = 10.0):
        import ray

        self.timeout = timeout
        self.ray_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.host, self.port = host, self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def where(self) -> dict:
        return {"host": self.host, "port": self.port, "ray_ip": self.ray_ip, "node_id": self.node_id}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            kind = _recv_exact(conn, 1)
            if kind == b"p":
                while True:
                    b = conn.recv(1)
                    if not b:
                        return
                    conn.sendall(b)
            elif kind == b"s":
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                left = n
                while left:
                    chunk = conn.recv(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                conn.sendall(b"k")
        except OSError:
            pass
        finally:
            conn.close()

    def measure(self, host: str, port: int, nbytes: int, pings: int = PINGS) -> dict:
        """Round trips (s) and transfer times (s) to the probe at ``host:port``; every socket
        operation is bounded by the timeout."""
        deadline = time.monotonic() + self.timeout

        def connect():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("probe time is up")
            c = socket.create_connection((host, port), timeout=left)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c
        rtts, transfers = [], []
        with connect() as c:
            c.sendall(b"p")
            for _ in range(pings):
                t0 = time.perf_counter()
                c.sendall(b"x")
                _recv_exact(c, 1)
                rtts.append(time.perf_counter() - t0)
                if time.monotonic() > deadline:
                    break
        payload = b"\0" * nbytes
        for _ in range(2):
            if time.monotonic() > deadline and transfers:
                break
            with connect() as c:
                c.sendall(b"s" + struct.pack("!Q", nbytes))
                t0 = time.perf_counter()
                c.sendall(payload)
                _recv_exact(c, 1)
                transfers.append(time.perf_counter() - t0)
        return {"rtts": rtts, "transfers": transfers}

    def close(self) -> None:
        self.sock.close()


@dataclass
class Link:
    a: str
    b: str
    latency_s: float
    bandwidth_Bps: float
    rtt_s: float
    transfer_s: float
    nbytes: int


def start_probes(nodes: list[RayNode], timeout: float) -> dict:
    """One probe actor per node, pinned to it; {name: (actor, where)}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(num_cpus=0, max_restarts=0)(Probe)
    actors = {r.name: cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(r.node_id, soft=False),
                                  name=None).remote(r.ip, timeout) for r in nodes}
    try:
        wheres = ray.get([a.where.remote() for a in actors.values()], timeout=60 + timeout)
    except Exception:
        for a in actors.values():
            ray.kill(a)
        raise
    return {n: (a, w) for (n, a), w in zip(actors.items(), wheres)}


def measure_links(nodes: list[RayNode], probes: dict, nbytes: int, timeout: float, progress=None) -> list[Link]:
    import ray

    links = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            actor = probes[a.name][0]
            w = probes[b.name][1]
            try:
                m = ray.get(actor.measure.remote(w["host"], w["port"], nbytes), timeout=timeout + 10)
            except Exception as e:   # GetTimeoutError, RayTaskError(ConnectionError), ...
                raise HexplanError(f"--probe-timeout: cannot measure the link {a.name} ({a.ip}) -> {b.name} "
                                   f"({b.ip}:{w['port']}) within {timeout:g} s: {str(e).splitlines()[-1]}") from None
            rtt = statistics.median(m["rtts"])
            best = min(m["transfers"])
            links.append(Link(a.name, b.name, rtt / 2, nbytes / best, rtt, best, nbytes))
            if progress:
                progress(f"{a.name} <-> {b.name}: {links[-1].bandwidth_Bps * 8 / 1e9:.2f} Gbps, "
                         f"{links[-1].latency_s * 1e3:.3f} ms")
    return links


def regions(names: list[str], links: list[Link], threshold_s: float) -> dict:
    """{name: region}: single-linkage groups of nodes joined by links under ``threshold_s``;
    {} when there is one group only."""
    parent = {n: n for n in names}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for link in links:
        if link.latency_s < threshold_s:
            parent[find(link.a)] = find(link.b)
    groups: dict = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    if len(groups) < 2:
        return {}
    out = {}
    for i, members in enumerate(groups.values()):
        for n in members:
            out[n] = f"region{i}"
    return out


# ---- the file ---------------------------------------------------------------------------------

def _bw(Bps: float) -> str:
    mbps = Bps * 8 / 1e6
    return f"{mbps:.0f}Mbps" if mbps >= 1000 else f"{max(mbps, 0.001):.4g}Mbps"


def _lat(s: float) -> str:
    return f"{max(s * 1e3, 0.0):.4g}ms"


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def render(nodes: list[RayNode], links: list[Link], region_of: dict, *, address: str, when: str,
           nbytes: int, threshold_s: float, name: str = "ray-cluster") -> str:
    lines = [f"# Written by `hexplan discover --ray {address}` on {when} from the Ray cluster's nodes.",
             f"# Links measured between probe actors pinned to each node: latency = half the median of {PINGS} "
             "TCP ping-pong round trips,",
             f"# bandwidth = best of 2 transfers of {nbytes / 1e6:g} MB (one direction; taken as symmetric).",
             f"# Regions: nodes joined by links under {threshold_s * 1e3:g} ms one-way (--region-latency-ms)"
             + ("." if region_of else "; all nodes are one group, so no region is written.")]
    fill = [r for r in nodes if r.note]
    if fill:
        lines.append(f"# FILL IN: {len(fill)} node(s) Ray cannot type ({', '.join(r.name for r in fill)}); see their "
                     "comments. The file is valid as written, but plans for those GPUs will be wrong.")
    lines += [f"name: {name}"]
    head = next((r for r in nodes if r.head), None)
    if head is not None:
        lines.append(f"coordinator: {head.name}   # the Ray head node")
    lines.append("nodes:")
    for r in nodes:
        info = (f"Ray node {r.node_id[:12]}, {r.ip}, {r.cpus:g} CPU(s), {r.memory / 1e9:.1f} GB RAM, {r.gpus} GPU(s)"
                + (f", accelerator_type {r.ray_type}" if r.ray_type else "")
                + (", named by its hexplan_node resource" if r.named_by_resource else ""))
        lines.append(f"  # {info}")
        if r.note:
            lines.append(f"  # {r.note}")
        region = f", region: {region_of[r.name]}" if r.name in region_of else ""
        lines.append(f"  - {{name: {r.name}, gpu: {r.gpu}, count: {r.count}{region}, "
                     f"address: '{_host(r.ip)}:{r.port}'}}")
    lines.append("network:")
    if links:
        slow = min(links, key=lambda k: k.bandwidth_Bps)
        far = max(links, key=lambda k: k.latency_s)
        lines.append(f"  default: {{bandwidth: {_bw(slow.bandwidth_Bps)}, latency: {_lat(far.latency_s)}}}   "
                     "# the slowest measured figures, for nodes added later")
        lines.append("  links:")
        for k in links:
            lines.append(f"    - {{between: [{k.a}, {k.b}], bandwidth: {_bw(k.bandwidth_Bps)}, latency: {_lat(k.latency_s)}}}"
                         f"   # {k.nbytes / 1e6:g} MB in {k.transfer_s * 1e3:.3g} ms, round trip {k.rtt_s * 1e3:.3g} ms")
    else:
        lines.append("  default: {bandwidth: 10Gbps, latency: 1ms}   # not measured: a single node")
    return "\n".join(lines) + "\n"


# ---- connecting -------------------------------------------------------------------------------

def check_address(address: str, flag: str = "--ray") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise SpecError(f"expected the Ray cluster's HOST:PORT (its GCS, `ray start --head` prints it), got {address!r}",
                        field=flag)
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _speaks_http2(host: str, port: int, timeout: float) -> bool:
    """Whether the server at ``host:port`` answers the HTTP/2 preface with a SETTINGS frame, as
    a gRPC server (Ray's GCS) does. OSError when nothing listens."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        head = b""
        try:
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:
            return False
    return len(head) == 9 and head[3] == 0x04


def connect(address: str, flag: str = "--ray", timeout: float = 5.0) -> bool:
    """``ray.init`` to the cluster at ``address`` (HOST:PORT of its GCS) unless this process is
    already connected. Returns whether it connected (and so should ``ray.shutdown()``).

    An address on loopback keeps the driver on loopback too: Ray would otherwise resolve
    127.0.0.1 to this machine's outward address, where a cluster started with
    ``--node-ip-address=127.0.0.1`` does not listen."""
    host, port = check_address(address, flag)
    try:
        import ray
    except ImportError:
        raise HexplanError(f"{flag} needs Ray: pip install 'hexplan[ray]'") from None
    try:
        grpc_server = _speaks_http2(host, port, timeout)
    except OSError as e:
        raise SpecError(f"no Ray cluster answers at {address}: {e.strerror or e}", field=flag) from None
    if not grpc_server:    # ray.init would retry for minutes
        raise SpecError(f"{address} answers but is not a Ray cluster's GCS (it does not speak gRPC)", field=flag)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if current.rpartition(":")[2] != str(port):
            raise SpecError(f"this process is already connected to the Ray cluster at {current}", field=flag)
        return False
    kwargs = {}
    if is_loopback(host):
        import ray._private.ray_constants as ray_constants   # read at call time by services.get_node_ip_address
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SpecError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())[:300]}",
                        field=flag) from None
    return True


def discover(address: str, *, default_gpu_type: str = "cpu", cpu_workers: int = 1, probe_mb: float = 4.0,
             probe_timeout: float = 10.0, region_latency_ms: float = 2.0, name: str = "ray-cluster",
             progress=None) -> tuple[str, dict]:
    """The cluster YAML text and facts for tests ({"nodes": [...], "probes": {name: where}})."""
    if default_gpu_type not in CATALOG:
        raise SpecError(f"unknown GPU type {default_gpu_type!r}; known: {', '.join(CATALOG)}", field="--default-gpu-type")
    for flag, v in (("--probe-mb", probe_mb), ("--probe-timeout", probe_timeout),
                    ("--region-latency-ms", region_latency_ms)):
        if not 0 < v < float("inf"):
            raise SpecError(f"must be a positive number, got {v:g}", field=flag)
    if cpu_workers < 1:
        raise SpecError(f"must be an integer >= 1, got {cpu_workers}", field="--cpu-workers")
    mine = connect(address)
    import ray

    probes = {}
    try:
        nodes = read_nodes(ray.nodes(), default_gpu_type, cpu_workers)
        if not nodes:
            raise SpecError("the Ray cluster has no live node", field="--ray")
        for r in nodes:
            if r.gpu not in CATALOG:
                raise SpecError(f"{r.gpu!r} (node {r.name}, label or resource {GPU_LABEL}) is not a built-in GPU type; "
                                f"known: {', '.join(CATALOG)}", field="nodes.gpu")
        nbytes = int(probe_mb * 1e6)
        probes = start_probes(nodes, probe_timeout) if len(nodes) > 1 else {}
        links = measure_links(nodes, probes, nbytes, probe_timeout, progress) if probes else []
        region_of = regions([r.name for r in nodes], links, region_latency_ms / 1e3)
        when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = render(nodes, links, region_of, address=address, when=when, nbytes=nbytes,
                      threshold_s=region_latency_ms / 1e3, name=name)
        return text, {"nodes": nodes, "probes": {n: w for n, (_, w) in probes.items()}, "links": links}
    finally:
        for actor, _ in probes.values():
            try:
                ray.kill(actor)
            except Exception:
                pass
        if mine:
            ray.shutdown()
