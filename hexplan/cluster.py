"""Cluster specs: nodes of GPUs, regions, and the network between them.

A cluster YAML file (documented in docs/cluster-format.md)::

    name: hexgen-case
    coordinator: n0            # optional: the node that runs the gateway (default: first node)
    gpu_types:                 # optional: custom GPU types or profiles for built-in ones
      MyGPU: {memory: 24GB, memory_bandwidth: 936GB/s, fp16_tflops: 71, price_per_hour: 0.4}
    nodes:
      - {name: n0, gpu: A6000, count: 4, region: r1, interconnect: 32GB/s, address: 10.0.0.1:50051}
    network:
      default: {bandwidth: 10Gbps, latency: 0.5ms}
      links:
        - {between: [n0, n1], bandwidth: 25Gbps, latency: 0.2ms}   # node names or region names

A link rule naming two nodes beats one naming a node and a region, which beats one naming two
regions, which beats the default; among equally specific rules the last one wins. Bandwidth is
per pair of nodes, in each direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .gpus import CATALOG, GROUP_TABLES, GpuType, Profile, ProfileTable
from .units import UnitError, exact_bandwidth, exact_size, exact_time, parse_bandwidth, parse_size, parse_time
from .yamlio import Locator, load_document, loads_document, plain, show

INTRA_NODE_LATENCY = 5e-6  # s, one hop over NVLink/PCIe inside a node
DEFAULT_BANDWIDTH = 10e9 / 8  # 10 Gbps
DEFAULT_LATENCY = 1e-3
MAX_GPUS_PER_NODE = 64


@dataclass(frozen=True)
class Node:
    name: str
    gpu: GpuType
    count: int
    region: str = ""
    interconnect: float = 0.0  # bytes/s per GPU inside the node
    address: str | None = None  # host:port of this node's executor
    host: str = ""  # a machine it shares with other nodes (Cluster.hosts); "" for its own


@dataclass(frozen=True)
class Host:
    """One machine that several nodes' workers share (CPU workers as separate processes: the
    local clusters of the executor's tests and benchmarks). While stages of its nodes run at once
    they share its ``cores`` and memory bandwidth; the simulator slows them (hexplan.simulator,
    "Shared hosts", and ``slowdown``). Each worker gets max(1, cores // workers) threads, as
    `hexplan launch` gives them."""
    name: str
    cores: int
    contention: float = 0.0

    def threads(self, workers: int) -> int:
        """Threads each of ``workers`` workers here gets: `hexplan launch`'s default."""
        return max(1, self.cores // workers)

    def slowdown(self, stage: tuple, others: tuple = ()) -> float:
        """Step-time multiplier of a stage while ``others`` run beside it here. Each is
        (workers, threads per worker, compute share): the share of its step its workers compute;
        a TP stage's ranks wait on each other's all-reduces for the rest, leaving their cores.

        * The cores are time-shared while the stage's own threads, with those of the others
          computing at that moment, exceed ``cores``: ``max(1, threads / cores)``, averaged
          over the others' phases (each computing for its share of the time, independently).
          Its own threads count whole: a TP stage's ranks run in lockstep, so a rank waiting
          for its core holds the others up, and their waits stretch with it.
        * To a 1-worker stage, a TP stage beside it counts one worker's threads, not all its
          ranks': its ranks take turns on the cores it leaves (a rank waiting at an all-reduce
          sleeps and hands its core to its peer), and the lone worker, never waiting on a
          peer, keeps its own. Measured on the 2-core development host (docs/fidelity.md, "A
          lone worker beside a TP group"): a TP-1 stage overlapped by a TP-2 stage's step
          computed 1.11x its modelled time, 1.02x alone, as beside another TP-1 stage.
        * Every running worker beyond the first adds ``contention`` (memory bandwidth, caches).
        """
        w, t, _ = stage
        # the distribution of the threads the others compute with: {threads: probability}
        dist = {0: 1.0}
        for ow, ot, share in others:
            if share <= 0.0:
                continue
            n, nxt = (ot if w == 1 else ow * ot), {}
            for k, p in dist.items():
                if share < 1.0:
                    nxt[k] = nxt.get(k, 0.0) + p * (1.0 - share)
                nxt[k + n] = nxt.get(k + n, 0.0) + p * min(1.0, share)
            dist = nxt
        own = w * t
        shared = sum(p * max(1.0, (own + k) / self.cores) for k, p in dist.items())
        workers = w + sum(o[0] for o in others)
        return shared * (1.0 + self.contention * (workers - 1))


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s
    latency: float    # s


@dataclass(frozen=True)
class LinkRule:
    between: tuple[str, str]
    link: Link


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    default_link: Link = Link(DEFAULT_BANDWIDTH, DEFAULT_LATENCY)
    links: tuple[LinkRule, ...] = ()
    coordinator: str = ""  # node name; "" means the first node
    source: str | None = field(default=None, compare=False)  # file it was read from
    hosts: tuple[Host, ...] = ()   # machines shared by several nodes (Node.host)

    def __post_init__(self):
        # Lookup caches (not fields: they do not take part in equality or repr).
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})
        object.__setattr__(self, "_links", {})
        # link() depends on a node only through its name where a rule names it, else its region:
        # caching per such class keeps the cache O(classes^2), not O(nodes^2) (1.3 M pairs,
        # 109 MB, at 4096 GPUs)
        named = {x for rule in self.links for x in rule.between}
        object.__setattr__(self, "_link_class", {n.name: ("node", n.name) if n.name in named else
                                                 ("region", n.region) for n in self.nodes})

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def workers_by_host(self, stages) -> dict[str, int]:
        """Workers (TP ranks) that ``stages`` put on each shared machine: {host name: workers}.
        `hexplan launch` gives each max(1, cores // workers) threads."""
        out: dict[str, int] = {}
        for s in stages:
            h = self._by_name[s.node].host
            if h:
                out[h] = out.get(h, 0) + s.tp
        return out

    def host(self, name: str) -> Host | None:
        """The shared machine named ``name`` (a node's ``host``), or None."""
        for h in self.hosts:
            if h.name == name:
                return h
        return None

    @property
    def coordinator_node(self) -> Node:
        return self.node(self.coordinator) if self.coordinator else self.nodes[0]

    @property
    def regions(self) -> list[str]:
        out: list[str] = []
        for n in self.nodes:
            if n.region not in out:
                out.append(n.region)
        return out

    @property
    def total_gpus(self) -> int:
        return sum(n.count for n in self.nodes)

    @property
    def total_memory(self) -> float:
        return sum(n.count * n.gpu.memory for n in self.nodes)

    @property
    def price_per_hour(self) -> float:
        return sum(n.count * n.gpu.price_per_hour for n in self.nodes)

    def link(self, a: str, b: str) -> Link:
        """The link between nodes ``a`` and ``b`` (the node's own fabric when a == b)."""
        key = (a, b) if a == b else (self._link_class[a], self._link_class[b])
        cached = self._links.get(key)
        if cached is not None:
            return cached
        na, nb = self.node(a), self.node(b)
        if a == b:
            link = self._links[key] = Link(na.interconnect, INTRA_NODE_LATENCY)
            return link
        best, best_score = self.default_link, -1
        for rule in self.links:
            x, y = rule.between
            for p, q in ((x, y), (y, x)):
                sp = 2 if p == na.name else (1 if na.region and p == na.region else 0)
                sq = 2 if q == nb.name else (1 if nb.region and q == nb.region else 0)
                if sp and sq and sp + sq >= best_score:
                    best, best_score = rule.link, sp + sq
        self._links[key] = best
        return best

    def with_nodes(self, nodes) -> "Cluster":
        return replace(self, nodes=tuple(nodes))


# ---------------------------------------------------------------------------------------
# Parsing

_NODE_KEYS = {"name", "gpu", "count", "region", "interconnect", "address", "host"}
_TOP_KEYS = {"name", "nodes", "network", "gpu_types", "coordinator", "description", "hosts"}
_GPU_KEYS = {"memory", "memory_bandwidth", "fp16_tflops", "interconnect", "price_per_hour", "profiles"}


def load_cluster(path) -> Cluster:
    """Read and check a cluster YAML file. Raises SpecError naming file, line and field."""
    data, lines = load_document(path)
    return cluster_from_dict(data, Locator(str(path), lines))


def loads_cluster(text: str, file: str | None = None) -> Cluster:
    data, lines = loads_document(text, file=file)
    return cluster_from_dict(data, Locator(file, lines))


def _check_keys(d: dict, allowed: set, path, loc: Locator) -> None:
    for k in d:
        if k not in allowed:
            raise loc.error(path + (k,), f"unknown field {show(k)}; expected one of {', '.join(sorted(allowed))}")


def _positive(value, path, loc: Locator, parser, what: str, allow_zero=False) -> float:
    if value is None:
        raise loc.error(path, f"missing {what}")
    try:
        x = parser(value)
    except UnitError as e:
        raise loc.error(path, str(e)) from None
    if x < 0 or (x == 0 and not allow_zero):
        raise loc.error(path, f"must be {'non-negative' if allow_zero else 'positive'}, got {show(value)}")
    return x


def _number(value, path, loc: Locator, what: str, allow_zero=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise loc.error(path, f"{what} must be a number, got {show(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise loc.error(path, f"{what} must be finite")
    if value < 0 or (value == 0 and not allow_zero):
        raise loc.error(path, f"{what} must be {'non-negative' if allow_zero else 'positive'}, got {show(value)}")
    return float(value)


def _table(d, path, loc: Locator) -> ProfileTable:
    if not isinstance(d, dict) or not d:
        raise loc.error(path, "expected a mapping like {1: 1.4, 100: 2.5} (x -> milliseconds)")
    pts = []
    for k, v in d.items():
        x = _number(_json_key(k), path + (k,), loc, "batch/tokens")
        y = _number(v, path + (k,), loc, "milliseconds")
        pts.append((x, y))
    return ProfileTable(tuple(sorted(pts)))


_PROFILE_TABLES = ("decode_ms", "prefill_ms", "lm_head_ms", "allreduce_ms", "call_ms")


def _profile(tables: dict, pp, loc: Locator) -> Profile:
    """One model's profile: the per-layer tables, the LM head's table, the TP all-reduce's
    (``allreduce_ms`` with the degree it was measured at, ``allreduce_tp``) and a call's own
    cost per stage (``call_ms``)."""
    _check_keys(tables, {*_PROFILE_TABLES, "allreduce_tp", "by_tp"}, pp, loc)
    got = {k: _table(tables[k], pp + (k,), loc) for k in _PROFILE_TABLES if k in tables}
    by_tp = _by_tp(tables["by_tp"], pp + ("by_tp",), loc) if "by_tp" in tables else ()
    degree = 0
    if "allreduce_tp" in tables:
        degree = tables["allreduce_tp"]
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
            raise loc.error(pp + ("allreduce_tp",), f"must be an integer >= 2 (the TP degree allreduce_ms was "
                            f"measured at), got {show(degree)}")
        if "allreduce_ms" not in tables:
            raise loc.error(pp + ("allreduce_tp",), "given without allreduce_ms (the all-reduce table it qualifies)")
    elif "allreduce_ms" in tables:
        raise loc.error(pp + ("allreduce_ms",), "needs allreduce_tp, the TP degree it was measured at (e.g. "
                        "allreduce_tp: 2)")
    return Profile(**got, allreduce_tp=degree, by_tp=by_tp)


def _by_tp(d, path, loc: Locator) -> tuple:
    """``by_tp``: {degree: {decode_ms, prefill_ms, lm_head_ms}}, each degree's own tables
    (``hexplan profile --tp d`` writes them), sorted by degree."""
    if not isinstance(d, dict) or not d:
        raise loc.error(path, "expected a mapping of TP degree -> {decode_ms, prefill_ms, lm_head_ms} "
                        "(e.g. by_tp: {2: {decode_ms: {...}, prefill_ms: {...}}})")
    out = {}
    for k, tables in d.items():
        degree = _json_key(k)   # a JSON key "2" reads as 2.0
        if isinstance(degree, float) and degree.is_integer():
            degree = int(degree)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
            raise loc.error(path + (k,), f"a TP degree must be an integer >= 2 (the TP-1 tables are the "
                            f"profile's own), got {show(k)}")
        if degree in out:
            raise loc.error(path + (k,), f"TP degree {degree} given twice")
        if not isinstance(tables, dict) or not tables:
            raise loc.error(path + (k,), "expected {decode_ms: {...}, prefill_ms: {...}} (and optionally lm_head_ms)")
        _check_keys(tables, set(GROUP_TABLES), path + (k,), loc)
        out[degree] = Profile(**{t: _table(tables[t], path + (k, t), loc) for t in GROUP_TABLES if t in tables})
    return tuple(sorted(out.items()))


def _json_key(k):
    """A number written as a mapping key in JSON, where keys are strings (``"100": 2.5``)."""
    if isinstance(k, str):
        try:
            return float(k)
        except ValueError:
            pass
    return k


def _gpu_type(name: str, d, path, loc: Locator) -> GpuType:
    if not isinstance(d, dict):
        raise loc.error(path, "a GPU type must be a mapping of its figures")
    _check_keys(d, _GPU_KEYS, path, loc)
    base = CATALOG.get(name)

    def get(key, parser, what, default=None):
        if key in d:
            return _positive(d[key], path + (key,), loc, parser, what)
        if base is not None:
            return getattr(base, key)
        if default is not None:
            return default
        raise loc.error(path + (key,), f"missing {what} for custom GPU type {show(name)}")

    memory = get("memory", parse_size, "memory")
    bw = get("memory_bandwidth", parse_bandwidth, "memory bandwidth")
    if "fp16_tflops" in d:
        tflops = _number(d["fp16_tflops"], path + ("fp16_tflops",), loc, "fp16_tflops")
    elif base is not None:
        tflops = base.fp16_tflops
    else:
        raise loc.error(path + ("fp16_tflops",), f"missing fp16_tflops for custom GPU type {show(name)}")
    inter = get("interconnect", parse_bandwidth, "interconnect", default=32e9)
    price = (_number(d["price_per_hour"], path + ("price_per_hour",), loc, "price_per_hour", allow_zero=True)
             if "price_per_hour" in d else (base.price_per_hour if base else 0.0))
    profiles = base.profiles if base else ()
    if "profiles" in d:
        pd = d["profiles"]
        if not isinstance(pd, dict):
            raise loc.error(path + ("profiles",), "expected a mapping of model name -> {decode_ms, prefill_ms}")
        profs = []
        for model_name, tables in pd.items():
            pp = path + ("profiles", model_name)
            if not isinstance(tables, dict):
                raise loc.error(pp, "expected {decode_ms: {...}, prefill_ms: {...}}")
            profs.append((str(model_name), _profile(tables, pp, loc)))
        profiles = tuple(profs)
    return GpuType(name, memory, bw, tflops, inter, price, profiles)


def cluster_from_dict(data, loc: Locator) -> Cluster:
    if not isinstance(data, dict):
        raise loc.error((), "a cluster spec must be a YAML mapping with 'nodes' (and optional 'network')")
    _check_keys(data, _TOP_KEYS, (), loc)
    name = data.get("name", "cluster")
    if not isinstance(name, str) or not name:
        raise loc.error(("name",), "must be a non-empty string")

    gpu_types = dict(CATALOG)
    gt = data.get("gpu_types") or {}
    if not isinstance(gt, dict):
        raise loc.error(("gpu_types",), "expected a mapping of GPU type name -> figures")
    for tname, td in gt.items():
        if not isinstance(tname, str) or not tname:
            raise loc.error(("gpu_types",), f"GPU type names must be strings, got {show(tname)}")
        gpu_types[tname] = _gpu_type(tname, td, ("gpu_types", tname), loc)

    hosts = _hosts(data.get("hosts"), loc)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise loc.error(("nodes",), "missing or empty: list at least one node")
    nodes: list[Node] = []
    names: set[str] = set()
    for i, nd in enumerate(raw_nodes):
        p = ("nodes", i)
        if not isinstance(nd, dict):
            raise loc.error(p, "each node must be a mapping like {name: n0, gpu: A100-80G, count: 8}")
        _check_keys(nd, _NODE_KEYS, p, loc)
        nname = nd.get("name")
        if not isinstance(nname, str) or not nname:
            raise loc.error(p + ("name",), "missing node name")
        if nname in names:
            raise loc.error(p + ("name",), f"duplicate node name {show(nname)}")
        names.add(nname)
        gname = nd.get("gpu")
        if gname is None:
            raise loc.error(p + ("gpu",), "missing GPU type")
        if not isinstance(gname, str) or gname not in gpu_types:
            raise loc.error(p + ("gpu",), f"unknown GPU type {show(gname)}; known: {', '.join(map(plain, gpu_types))}")
        count = nd.get("count")
        if count is None:
            raise loc.error(p + ("count",), "missing GPU count")
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise loc.error(p + ("count",), f"must be a positive integer, got {show(count)}")
        if count > MAX_GPUS_PER_NODE:
            raise loc.error(p + ("count",), f"{count} GPUs in one machine; a node is one machine "
                            f"(at most {MAX_GPUS_PER_NODE}): list the machines as separate nodes")
        region = nd.get("region", "")
        if region is None:
            region = ""
        if not isinstance(region, str):
            raise loc.error(p + ("region",), f"must be a string, got {show(region)}")
        gpu = gpu_types[gname]
        inter = (_positive(nd["interconnect"], p + ("interconnect",), loc, parse_bandwidth, "interconnect")
                 if "interconnect" in nd else gpu.interconnect)
        address = nd.get("address")
        if address is not None:
            if not isinstance(address, str) or address.rpartition(":")[2].isdigit() is False or ":" not in address:
                raise loc.error(p + ("address",), f"expected host:port, got {show(address)}")
        host = nd.get("host", "") or ""
        if host and (not isinstance(host, str) or host not in hosts):
            raise loc.error(p + ("host",), f"unknown host {show(host)}; name one of the cluster's 'hosts'"
                            + (f" ({', '.join(map(plain, hosts))})" if hosts else " (there are none)"))
        nodes.append(Node(nname, gpu, count, region, inter, address, host))

    regions = {n.region for n in nodes if n.region}
    clash = regions & names
    if clash:
        c = sorted(clash)[0]
        raise loc.error(("nodes",), f"{show(c)} is both a node name and a region name; link rules would be ambiguous")

    net = data.get("network") or {}
    if not isinstance(net, dict):
        raise loc.error(("network",), "expected a mapping with 'default' and/or 'links'")
    _check_keys(net, {"default", "links"}, ("network",), loc)

    def link(d, p) -> Link:
        if not isinstance(d, dict):
            raise loc.error(p, "expected {bandwidth: 10Gbps, latency: 1ms}")
        _check_keys(d, {"bandwidth", "latency", "between"}, p, loc)
        bw = _positive(d.get("bandwidth"), p + ("bandwidth",), loc, parse_bandwidth, "bandwidth")
        lat = _positive(d.get("latency"), p + ("latency",), loc, parse_time, "latency", allow_zero=True)
        return Link(bw, lat)

    default = link(net["default"], ("network", "default")) if "default" in net else Link(DEFAULT_BANDWIDTH, DEFAULT_LATENCY)
    if "between" in (net.get("default") or {}):
        raise loc.error(("network", "default", "between"), "the default link applies to every pair; remove 'between'")
    rules: list[LinkRule] = []
    raw_links = net.get("links") or []
    if not isinstance(raw_links, list):
        raise loc.error(("network", "links"), "expected a list of {between: [a, b], bandwidth, latency}")
    known = names | regions
    for i, ld in enumerate(raw_links):
        p = ("network", "links", i)
        lk = link(ld, p)
        between = ld.get("between")
        if not isinstance(between, list) or len(between) != 2:
            raise loc.error(p + ("between",), "expected two node or region names, like [n0, n1]")
        for j, x in enumerate(between):
            if not isinstance(x, str) or x not in known:
                raise loc.error(p + ("between", j), f"{show(x)} is neither a node nor a region; "
                                f"nodes: {', '.join(map(plain, sorted(names)))}" + (f"; regions: {', '.join(map(plain, sorted(regions)))}" if regions else ""))
        if between[0] == between[1] and between[0] in names:
            raise loc.error(p + ("between",), "a link joins two different nodes (use the node's 'interconnect' for its own fabric)")
        rules.append(LinkRule((between[0], between[1]), lk))

    coord = data.get("coordinator", "")
    if coord and (not isinstance(coord, str) or coord not in names):
        raise loc.error(("coordinator",), f"unknown node {show(coord)}; nodes: {', '.join(map(plain, sorted(names)))}")

    return Cluster(name, tuple(nodes), default, tuple(rules), coord or "", loc.file, tuple(hosts.values()))


def _hosts(raw, loc: Locator) -> dict:
    """The ``hosts`` section: {name: {cores: N, contention: F}} (docs/cluster-format.md)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise loc.error(("hosts",), "expected a mapping of host name -> {cores: N, contention: F}")
    out = {}
    for name, d in raw.items():
        p = ("hosts", name)
        if not isinstance(name, str) or not name:
            raise loc.error(("hosts",), f"host names must be strings, got {show(name)}")
        if not isinstance(d, dict):
            raise loc.error(p, "expected {cores: N, contention: F}")
        _check_keys(d, {"cores", "contention"}, p, loc)
        cores = d.get("cores")
        if isinstance(cores, bool) or not isinstance(cores, int) or cores <= 0:
            raise loc.error(p + ("cores",), f"must be a positive integer, got {show(cores)}")
        cont = d.get("contention", 0.0)
        if isinstance(cont, bool) or not isinstance(cont, (int, float)) or not 0 <= cont <= 10:
            raise loc.error(p + ("contention",), f"must be a number from 0 to 10, got {show(cont)}")
        out[name] = Host(name, cores, float(cont))
    return out


# ---------------------------------------------------------------------------------------
# Writing

def cluster_to_dict(cluster: Cluster, keep=None, model: str | None = None) -> dict:
    """``cluster`` as a spec cluster_from_dict reads back to the same nodes, links and GPU figures.

    ``keep``: node names to write (default all), with the link rules that can still apply to
    them (both ends a kept node or a region of one, in their order, so the same rule wins for
    every pair of kept nodes) and the coordinator (named even when the spec left it implicit).
    Quantities are written with units, exactly (hexplan.units.exact_*). GPU types that differ
    from the catalog's are written in full; ``model`` keeps only that model's profiles.
    A plan's ``cluster`` section is this dict of the nodes it uses (hexplan.solver.assemble writes it).
    """
    nodes = [n for n in cluster.nodes if keep is None or n.name in keep or n is cluster.coordinator_node]
    names = {n.name for n in nodes}
    places = names | {n.region for n in nodes if n.region}
    used = {n.host for n in nodes if n.host}
    out: dict = {"name": cluster.name, "coordinator": cluster.coordinator_node.name,
                 **({"hosts": {h.name: {"cores": h.cores, "contention": h.contention}
                               for h in cluster.hosts if h.name in used}} if used else {}),
                 "nodes": [_node_dict(n) for n in nodes],
                 "network": {"default": _link_dict(cluster.default_link),
                             "links": [{"between": list(r.between), **_link_dict(r.link)}
                                       for r in cluster.links if set(r.between) <= places]}}
    custom = {n.gpu.name: n.gpu for n in nodes if CATALOG.get(n.gpu.name) != n.gpu}
    if custom:
        out["gpu_types"] = {name: _gpu_dict(g, model) for name, g in custom.items()}
    return out


def _node_dict(n: Node) -> dict:
    return {"name": n.name, "gpu": n.gpu.name, "count": n.count, **({"region": n.region} if n.region else {}),
            "interconnect": exact_bandwidth(n.interconnect), **({"address": n.address} if n.address else {}),
            **({"host": n.host} if n.host else {})}


def _link_dict(link: Link) -> dict:
    return {"bandwidth": exact_bandwidth(link.bandwidth), "latency": exact_time(link.latency)}


def _gpu_dict(g: GpuType, model: str | None) -> dict:
    d: dict = {"memory": exact_size(g.memory), "memory_bandwidth": exact_bandwidth(g.memory_bandwidth),
               "fp16_tflops": g.fp16_tflops, "interconnect": exact_bandwidth(g.interconnect),
               "price_per_hour": g.price_per_hour}
    profiles = {name: _profile_dict(p) for name, p in g.profiles if model is None or name == model}
    if profiles:
        d["profiles"] = profiles
    return d


def _profile_dict(p: Profile) -> dict:
    table = lambda t: {int(x) if float(x).is_integer() else x: ms for x, ms in t.points}
    d = {k: table(getattr(p, k)) for k in _PROFILE_TABLES if getattr(p, k) is not None}
    if p.allreduce_ms is not None:
        d["allreduce_tp"] = p.allreduce_tp
    if p.by_tp:
        d["by_tp"] = {degree: _profile_dict(q) for degree, q in p.by_tp}
    return d
