"""Property-based tests: arbitrary input never crashes the loader with anything but SpecError,
and every plan the solver returns for a small valid cluster passes the independent validator."""
from __future__ import annotations

import copy
import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

import hexplan
from hexplan import Cluster, InfeasibleError, SpecError, loads_cluster, validate_plan
from hexplan.gpus import CATALOG

FILE = "fuzz.yaml"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIELD_NAMES = ["name", "nodes", "network", "gpu_types", "coordinator", "description", "gpu", "count", "region",
               "interconnect", "address", "default", "links", "between", "bandwidth", "latency", "memory",
               "memory_bandwidth", "fp16_tflops", "price_per_hour", "profiles", "decode_ms", "prefill_ms",
               "n0", "n1", "r1", "T4", "MyGPU", "llama-2-7b"]
JUNK_STRINGS = ["", " ", "10 parsecs", "-5GB", "0Gbps", "1e400Gbps", "nan", "inf", "-1ms", "Z100", "T4", "A100-80G",
                "n0", "n1", "r1", "nowhere", "10Gbps", "24GB", "1ms", "host:port", "h:1", "GB", "5", "null", "~",
                "\x00", "é", "10GiB/s", "1.5.5GB", "--", "[", "{", "&a", "*a", "!!python/object:os.system"]


def check_result(text: str):
    """The property: a Cluster (that holds together) or a one-line SpecError naming the file."""
    try:
        c = loads_cluster(text, file=FILE)
    except SpecError as e:
        event("SpecError" + (f" in {e.field.split('.')[0].split('[')[0]}" if e.field else ""))
        msg = str(e)
        assert msg and "\n" not in msg, msg
        assert msg.startswith(FILE), msg
        return None
    event("Cluster")
    assert isinstance(c, Cluster)
    assert c.nodes and len({n.name for n in c.nodes}) == len(c.nodes)
    for n in c.nodes:
        assert isinstance(n.count, int) and n.count > 0
        assert n.gpu.memory > 0 and n.gpu.memory_bandwidth > 0 and n.gpu.fp16_tflops > 0
        assert math.isfinite(n.interconnect) and n.interconnect > 0
    names = [n.name for n in c.nodes][:4]
    for a in names:
        for b in names:
            link = c.link(a, b)
            assert math.isfinite(link.bandwidth) and link.bandwidth > 0
            assert math.isfinite(link.latency) and link.latency >= 0
    assert c.coordinator_node in c.nodes
    return c


# ---- (a) random text and random YAML-ish structures ---------------------------------------

yamlish_text = st.lists(st.sampled_from(
    FIELD_NAMES + JUNK_STRINGS + [":", ": ", "- ", "\n", "\n  ", "\n    ", "{", "}", "[", "]", ", ", "#",
                                  "'", '"', "&x ", "*x", "<<: ", "? ", "|", ">", "\t", "---", "...", "1", "-3",
                                  "0.5", "true", "!!binary ", "!!int "]), max_size=40).map("".join)


@settings(max_examples=100, **SETTINGS)
@given(st.one_of(st.text(max_size=200), yamlish_text))
def test_random_text_is_a_cluster_or_a_spec_error(text):
    check_result(text)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10, max_value=10), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(JUNK_STRINGS), st.text(max_size=12))
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none())
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=25)


@settings(max_examples=100, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["name", "nodes", "network", "gpu_types", "coordinator", "description"]),
                       structures, max_size=6) | structures,
       st.sampled_from(["yaml", "json", "flow"]))
def test_random_structures_are_a_cluster_or_a_spec_error(data, fmt):
    if fmt == "json":
        try:
            text = json.dumps(data)
        except (TypeError, ValueError):
            text = yaml.safe_dump(data)
    else:
        text = yaml.safe_dump(data, default_flow_style=(fmt == "flow"), allow_unicode=True)
    check_result(text)


# ---- (b) mutations of valid clusters ----------------------------------------------------------

GPU_NAMES = list(CATALOG)


@st.composite
def valid_cluster_dicts(draw, max_nodes=3, max_count=4):
    """A valid cluster description as plain data (1-3 nodes, catalog GPUs, optional extras)."""
    n = draw(st.integers(1, max_nodes))
    regions = draw(st.lists(st.sampled_from(["", "us", "eu"]), min_size=n, max_size=n))
    nodes = []
    for i in range(n):
        node = {"name": f"n{i}", "gpu": draw(st.sampled_from(GPU_NAMES)), "count": draw(st.integers(1, max_count))}
        if regions[i]:
            node["region"] = regions[i]
        if draw(st.booleans()):
            node["interconnect"] = draw(st.sampled_from(["16GB/s", "64GB/s", "600GB/s", "100Gbps"]))
        nodes.append(node)
    d = {"name": draw(st.sampled_from(["c", "fuzz-cluster", "x y"])), "nodes": nodes}
    if draw(st.booleans()):
        d["coordinator"] = f"n{draw(st.integers(0, n - 1))}"
    bandwidths = ["100Mbps", "1Gbps", "10Gbps", "25Gbps", "100Gbps", "5GB/s"]
    latencies = ["0ms", "50us", "0.2ms", "1ms", "40ms"]
    net = {}
    if draw(st.booleans()):
        net["default"] = {"bandwidth": draw(st.sampled_from(bandwidths)), "latency": draw(st.sampled_from(latencies))}
    ends = [f"n{i}" for i in range(n)] + sorted({r for r in regions if r})
    links = []
    for _ in range(draw(st.integers(0, 3))):
        a, b = draw(st.sampled_from(ends)), draw(st.sampled_from(ends))
        if a == b and a.startswith("n"):
            continue
        links.append({"between": [a, b], "bandwidth": draw(st.sampled_from(bandwidths)),
                      "latency": draw(st.sampled_from(latencies))})
    if links:
        net["links"] = links
    if net:
        d["network"] = net
    if draw(st.booleans()):
        d["gpu_types"] = {"MyGPU": {"memory": "24GB", "memory_bandwidth": "936GB/s", "fp16_tflops": 71,
                                    "price_per_hour": 0.4}}
        if draw(st.booleans()):
            nodes[0]["gpu"] = "MyGPU"
    return d


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _parent(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    return obj


junk_values = st.one_of(
    st.sampled_from(JUNK_STRINGS), st.integers(-5, 5), st.integers(), st.floats(), st.booleans(), st.none(),
    st.just([]), st.just({}), st.just(["n0", "n1"]), st.just({"bandwidth": "1Gbps"}), st.just(-1.5),
    st.just(10 ** 30), st.text(max_size=10))


@st.composite
def mutated_cluster_dicts(draw):
    d = draw(valid_cluster_dicts())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(d, path)
        op = draw(st.sampled_from(["drop", "replace", "replace", "add_key", "duplicate_item", "rename"]))
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = copy.deepcopy(draw(junk_values))   # st.just([]) hands out one shared list
        elif op == "add_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES + ["bogus"]))] = copy.deepcopy(draw(junk_values))
        elif op == "duplicate_item" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES + ["bogus"]))] = parent.pop(key)
    return d


@settings(max_examples=100, **SETTINGS)
@given(valid_cluster_dicts())
def test_valid_cluster_dicts_load(d):
    c = check_result(yaml.safe_dump(d))
    assert c is not None
    assert [n.name for n in c.nodes] == [n["name"] for n in d["nodes"]]
    assert [n.count for n in c.nodes] == [n["count"] for n in d["nodes"]]
    assert c.coordinator_node.name == d.get("coordinator", "n0")


@settings(max_examples=100, **SETTINGS)
@given(mutated_cluster_dicts(), st.booleans())
def test_mutated_clusters_are_a_cluster_or_a_spec_error(d, flow):
    check_result(yaml.safe_dump(d, default_flow_style=flow, allow_unicode=True))


@settings(max_examples=60, **SETTINGS)
@given(valid_cluster_dicts(), st.sampled_from(["\n", ": x", "  - ", "{", "]", "\t", "&a *a", "'"]),
       st.integers(0, 10 ** 6))
def test_text_damage_is_a_spec_error_or_a_cluster(d, damage, where):
    text = yaml.safe_dump(d)
    i = where % (len(text) + 1)
    check_result(text[:i] + damage + text[i:])


# ---- (c) small random valid clusters: solve, then validate independently -----------------------

def _solve_and_check(d, backend):
    cluster = loads_cluster(yaml.safe_dump(d))
    try:
        plan = hexplan.solve(cluster, model="llama-2-7b", time_limit=2, backend=backend)
    except InfeasibleError as e:
        # Without an SLO, infeasible can only mean "does not fit" (and the message says so).
        assert str(e).startswith("llama-2-7b does not fit in cluster"), str(e)
        event("infeasible")
        return None
    event(f"plan with {len(plan.pipelines)} pipeline(s)")
    problems = validate_plan(plan, cluster)
    assert problems == [], problems
    assert plan.throughput > 0
    assert plan.pipelines
    used = {(s.node, g) for p in plan.pipelines for s in p.stages for g in s.gpus}
    assert len(used) == sum(len(s.gpus) for p in plan.pipelines for s in p.stages)
    return plan


@settings(max_examples=50, **SETTINGS)
@given(valid_cluster_dicts())
def test_solver_plans_validate_heuristic(d):
    _solve_and_check(d, "none")


@settings(max_examples=10, **SETTINGS)
@given(valid_cluster_dicts())
def test_solver_plans_validate_highs(d):
    _solve_and_check(d, "highs")


@settings(max_examples=15, **SETTINGS)
@given(valid_cluster_dicts(max_nodes=2, max_count=4))
def test_big_enough_clusters_are_never_infeasible(d):
    """A cluster with room for several copies of llama-2-7b always gets a plan."""
    for node in d["nodes"]:
        node["gpu"] = "A100-80G"
    assume(sum(n["count"] for n in d["nodes"]) >= 2)
    plan = _solve_and_check(d, "none")
    assert plan is not None


@settings(max_examples=30, **SETTINGS)
@given(valid_cluster_dicts(), st.sampled_from(["throughput", "latency"]),
       st.one_of(st.none(), st.floats(5, 300)), st.one_of(st.none(), st.floats(50, 5000)))
def test_plans_under_slos_validate_and_round_trip(d, objective, tpot, ttft):
    """With SLOs the plan still validates (the validator re-checks them) and survives its own file format."""
    cluster = loads_cluster(yaml.safe_dump(d))
    try:
        plan = hexplan.solve(cluster, model="llama-2-7b", objective=objective, slo_tpot_ms=tpot, slo_ttft_ms=ttft,
                             time_limit=2, backend="none")
    except InfeasibleError as e:
        assert "does not fit" in str(e) or "best achievable" in str(e), str(e)
        event("infeasible")
        return
    event("plan")
    assert validate_plan(plan, cluster) == []
    for p in plan.pipelines:
        if p.weight > 0 and tpot is not None:
            assert p.decode_ms_per_token <= tpot * (1 + 1e-6)
    again = hexplan.loads_plan(plan.to_yaml())
    assert validate_plan(again, cluster) == []
    assert again.throughput == pytest.approx(plan.throughput, rel=1e-4)   # plan files round figures
