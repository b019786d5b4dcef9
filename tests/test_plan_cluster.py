"""A plan records the cluster of the nodes it uses; `hexplan simulate PLAN` needs nothing else.

* cluster_to_dict reads back (cluster_from_dict) to the same nodes, GPU figures, coordinator and
  link for every pair of kept nodes, on every example cluster and on custom/profiled GPU types.
* The cluster rebuilt from a solved plan (YAML and JSON) gives the same simulated numbers as the
  cluster file, in the library and on the command line.
* Older plans (no ``cluster.network``) need --cluster: one line naming the field; a malformed
  section is reported with file, line and field when the plan is loaded.
* Without --rate or --workload the traffic is Poisson at DEFAULT_LOAD of the predicted capacity,
  said on one stderr line; --json output stays pure JSON.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import yaml

import hexplan
from hexplan import SpecError, load_cluster, loads_cluster
from hexplan.cluster import Cluster, cluster_from_dict, cluster_to_dict
from hexplan.plan import loads_plan, plan_cluster
from hexplan.simulator import WorkloadSpec, simulate
from hexplan.simulator.run import DEFAULT_LOAD, capacity_rate
from hexplan.yamlio import Locator

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "cluster_specs"
HEXGEN = SPECS / "hexgen-case.yaml"

# Custom and overridden GPU types, a measured profile, regions, node-region and region rules, an
# implicit coordinator, and figures with no short exact spelling (1/3 GB/s, 1/3 s).
ODD = """\
name: odd
gpu_types:
  MyGPU: {memory: 24GB, memory_bandwidth: 936GB/s, fp16_tflops: 71, price_per_hour: 0.4}
  A100-40G:
    profiles:
      llama-2-7b: {decode_ms: {2: 0.4, 100: 0.9}, prefill_ms: {1000: 3.5}}
      llama-2-70b: {decode_ms: {2: 1.4}, lm_head_ms: {1: 0.3, 16: 0.5}, allreduce_ms: {1: 0.02, 512: 0.4}, allreduce_tp: 4}
nodes:
  - {name: a, gpu: A100-40G, count: 2, region: r1, interconnect: 0.333333333GB/s}
  - {name: b, gpu: MyGPU, count: 2, region: r2, address: 10.0.0.2:50051}
  - {name: c, gpu: L4, count: 1, region: r2}
  - {name: d, gpu: T4, count: 1}
network:
  default: {bandwidth: 1Gbps, latency: 0.3333333333s}
  links:
    - {between: [r1, r2], bandwidth: 100Mbps, latency: 40ms}
    - {between: [a, r2], bandwidth: 2Gbps, latency: 20ms}
    - {between: [c, d], bandwidth: 5Gbps, latency: 1us}
    - {between: [r1, r2], bandwidth: 200Mbps, latency: 30ms}
"""


def same_cluster(original: Cluster, rebuilt: Cluster, names, model=None) -> None:
    """Same coordinator, nodes (GPU figures, interconnect, region, address; the profiles, or
    ``model``'s only) and link between every two of ``names``."""
    assert rebuilt.coordinator_node.name == original.coordinator_node.name
    for n in names:
        a, b = original.node(n), rebuilt.node(n)
        if model is None:
            assert b == a
        else:
            assert replace(b, gpu=replace(b.gpu, profiles=())) == replace(a, gpu=replace(a.gpu, profiles=()))
            assert b.gpu.profile_for(model) == a.gpu.profile_for(model)
    for a, b in combinations(sorted(names), 2):
        assert rebuilt.link(a, b) == original.link(a, b), (a, b)
        assert rebuilt.link(b, a) == original.link(b, a), (b, a)


def reread(d: dict) -> Cluster:
    """Through YAML and JSON text, as a plan file carries it."""
    for text in (yaml.safe_dump(d), json.dumps(d)):
        c = loads_cluster(text)
    return c


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.yaml")) + ["odd"])
def test_cluster_to_dict_reads_back_the_same(spec):
    cluster = loads_cluster(ODD) if spec == "odd" else load_cluster(SPECS / spec)
    names = [n.name for n in cluster.nodes]
    same_cluster(cluster, reread(cluster_to_dict(cluster)), names)
    # A subset keeps the links between its nodes, and the coordinator.
    keep = set(names[1::3])
    d = cluster_to_dict(cluster, keep, model="llama-2-70b")
    assert {n["name"] for n in d["nodes"]} == keep | {cluster.coordinator_node.name}
    same_cluster(cluster, reread(d), keep | {cluster.coordinator_node.name}, "llama-2-70b")


def test_odd_cluster_section_keeps_only_what_applies():
    cluster = loads_cluster(ODD)
    d = cluster_to_dict(cluster, {"a", "b"}, model="llama-2-7b")
    assert [n["name"] for n in d["nodes"]] == ["a", "b"]
    # The c-d rule cannot apply to a or b; both region rules and the a-r2 rule can, in order.
    assert [r["between"] for r in d["network"]["links"]] == [["r1", "r2"], ["a", "r2"], ["r1", "r2"]]
    # Only the types that differ from the catalog, and only the plan's model's profile.
    assert set(d["gpu_types"]) == {"A100-40G", "MyGPU"}
    assert set(d["gpu_types"]["A100-40G"]["profiles"]) == {"llama-2-7b"}
    assert d["nodes"][1]["address"] == "10.0.0.2:50051" and d["nodes"][0]["region"] == "r1"
    assert d["network"]["default"] == {"bandwidth": "1Gbps", "latency": "0.3333333333s"}


# ---- solved plans: the rebuilt cluster simulates the same --------------------------------------

def solved(cluster_file, model, **kw):
    cluster = load_cluster(cluster_file)
    return hexplan.solve(cluster, model, **kw), cluster


@pytest.fixture(scope="module")
def hexgen():
    return solved(HEXGEN, "llama-2-70b", time_limit=5)


@pytest.mark.parametrize("which", ["hexgen", "helix-24", "two-regions", "odd"])
def test_rebuilt_cluster_simulates_the_same(which, hexgen):
    if which == "hexgen":
        plan, cluster = hexgen
    elif which == "odd":
        cluster = loads_cluster(ODD)
        plan = hexplan.solve(cluster, "llama-2-7b", time_limit=2, backend="none")
    else:
        plan, cluster = solved(SPECS / f"{which}.yaml", "llama-30b" if which == "helix-24" else "llama-2-13b",
                               time_limit=2, backend="none")
    assert "network" in plan.cluster
    spec = WorkloadSpec(rate=0.8 * capacity_rate(plan, cluster, WorkloadSpec(rate=1, duration=1)), duration=120)
    for text in (plan.to_yaml(), plan.to_json()):
        again = loads_plan(text)   # predictions are rounded in the file, the cluster section is exact
        assert plan_cluster(again) == plan_cluster(plan)
        want = simulate(again, cluster, spec, seed=1).to_dict()
        assert want["requests_completed"] > 0
        assert simulate(again, None, spec, seed=1).to_dict() == want
        assert simulate(again, plan_cluster(again), spec, seed=1).to_dict() == want


def test_plan_of_a_subset_records_only_its_nodes(hexgen):
    plan, cluster = hexgen
    used = {s.node for p in plan.pipelines for s in p.stages} | {cluster.coordinator_node.name}
    assert {n["name"] for n in plan.cluster["nodes"]} == used
    assert plan.cluster["name"] == "hexgen-case" and plan.cluster["coordinator"] == "n0"


def test_old_plans_need_the_cluster(hexgen):
    plan, cluster = hexgen
    old = dict(plan.cluster)
    del old["network"]
    old["nodes"] = [{k: v for k, v in n.items() if k != "interconnect"} for n in old["nodes"]]
    old_plan = loads_plan(plan.__class__(plan.model, plan.pipelines, plan.predicted, plan.solver,
                                         plan.assumptions, old).to_yaml())
    with pytest.raises(SpecError) as e:
        plan_cluster(old_plan)
    assert e.value.field == "cluster.network"
    with pytest.raises(SpecError) as e:
        simulate(old_plan, None, WorkloadSpec(rate=1, duration=10))
    assert e.value.field == "cluster.network"
    assert simulate(old_plan, cluster, WorkloadSpec(rate=1, duration=10)).requests_arrived > 0


def test_a_bad_cluster_section_names_file_line_and_field(hexgen):
    text = hexgen[0].to_yaml().replace("latency: 0.2ms", "latency: 0.2xs")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "0.2xs" in t)
    with pytest.raises(SpecError) as e:
        loads_plan(text, file="p.yaml")
    assert str(e.value).startswith(f"p.yaml:{line}: cluster.network.links[0].latency: unknown unit 'xs'")
    text = hexgen[0].to_yaml().replace("  network:", "  colour: red\n  network:")
    with pytest.raises(SpecError, match=r"cluster.colour: unknown field 'colour'"):
        loads_plan(text, file="p.yaml")


def test_locator_within_names_the_whole_path():
    loc = Locator("f.yaml", {("cluster",): 3, ("cluster", "nodes"): 4, ("cluster", "nodes", 1): 6})
    e = loc.within(("cluster",)).error(("nodes", 1, "gpu"), "bad")
    assert (e.file, e.line, e.field) == ("f.yaml", 6, "cluster.nodes[1].gpu")
    assert cluster_from_dict({"nodes": [{"name": "x", "gpu": "T4", "count": 1}]}, loc.within(("cluster",))).name


# ---- the command line ---------------------------------------------------------------------------

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def plan_files(hexgen, tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    (d / "p.yaml").write_text(hexgen[0].to_yaml())
    (d / "p.json").write_text(hexgen[0].to_json())
    old = yaml.safe_load(hexgen[0].to_yaml())
    del old["cluster"]["network"]
    (d / "old.yaml").write_text(yaml.safe_dump(old))
    return d


def test_cli_simulate_from_the_plan_alone(plan_files):
    args = ("--rate", "1.5", "--duration", "120", "--json")
    want = cli("simulate", plan_files / "p.yaml", "--cluster", HEXGEN, *args)
    assert want.returncode == 0, want.stderr
    for name in ("p.yaml", "p.json"):
        r = cli("simulate", plan_files / name, *args)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert json.loads(r.stdout) == json.loads(want.stdout)


def test_cli_old_plan_without_cluster_is_one_line(plan_files):
    r = cli("simulate", plan_files / "old.yaml", "--rate", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"hexplan: error: {plan_files / 'old.yaml'}: cluster.network: not recorded")
    assert "--cluster" in lines[0]
    r = cli("simulate", plan_files / "old.yaml", "--cluster", HEXGEN, "--rate", "1", "--duration", "30")
    assert r.returncode == 0, r.stderr


def test_cli_default_traffic(plan_files, hexgen):
    plan, cluster = hexgen
    r = cli("simulate", plan_files / "p.yaml", "--json", "--duration", "60")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)   # pure JSON: the note is on stderr
    capacity = plan.throughput / plan.assumptions["workload"]["output_tokens"]
    rate = float(f"{DEFAULT_LOAD * capacity:.3g}")
    assert d["workload"]["arrival"] == "poisson" and d["workload"]["rate_per_s"] == rate
    assert d["workload"]["duration_s"] == 60 and d["workload"]["prompt_tokens"] == "512"
    note = r.stderr.splitlines()
    assert len(note) == 1 and note[0].startswith("hexplan: no --rate or --workload: simulating Poisson arrivals at "
                                                 f"{DEFAULT_LOAD:.0%} of the plan's predicted capacity ({rate:g} of")
    assert "for 60 s" in note[0] and "(512/128)" in note[0]
    # The table run prints the same note, and the 600 s default; its lengths follow --output-len.
    r = cli("simulate", plan_files / "p.yaml", "--output-len", "64", "--arrival", "gamma")
    assert r.returncode == 0, r.stderr
    assert "gamma arrivals (cv 2)" in r.stderr and "for 600 s" in r.stderr and "output 64 tokens" in r.stderr
    assert f"at {float(f'{DEFAULT_LOAD * plan.throughput / 64:.3g}'):g} requests/s" in r.stdout
    # The help text states the rule with the same share.
    assert f"{DEFAULT_LOAD:.0%} of the plan's predicted" in " ".join(cli("simulate", "--help").stdout.split())


def test_cli_arrival_with_a_replayed_trace_is_an_error(plan_files):
    r = cli("simulate", plan_files / "p.yaml", "--workload", ROOT / "bench" / "traces" / "conversation_sample.jsonl",
            "--arrival", "gamma")
    assert r.returncode == 2 and r.stderr.startswith("hexplan: error: --rate: --arrival gamma needs a request rate")


def test_solve_writes_a_plan_that_simulates_alone(tmp_path):
    r = cli("solve", HEXGEN, "-m", "llama-2-7b", "--solver", "none", "--time-limit", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hexgen-case-llama-2-7b.plan.yaml"
    assert out.exists() and "plan written" not in r.stdout
    assert r.stderr.splitlines()[-1] == "hexplan: plan written to hexgen-case-llama-2-7b.plan.yaml"
    r = cli("simulate", out, "--duration", "30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("simulated llama-2-7b on hexgen-case:")


def test_gitignore_keeps_plan_files_out():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "*.plan.yaml" in lines and "*.plan.json" in lines
