"""Ray (issue 15): `hexplan discover --ray` and `hexplan launch --ray` on a local multi-node Ray
cluster (ray.cluster_utils.Cluster: two raylets on 127.0.0.1, each with a custom resource
hexplan_node:NAME standing for a machine; CPU workers; a tiny random checkpoint). Greedy
tokens are checked against transformers. Skipped without the [ray] extra."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent import futures

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import hf_greedy, loopback_ray, make_checkpoint, plan, wait_for  # noqa: E402

from hexplan.cli import main  # noqa: E402
from hexplan.cluster import load_cluster  # noqa: E402



@pytest.fixture(scope="module")
def cluster():
    """Two raylets on loopback: hexplan_node:a (the head) and hexplan_node:b; this process is
    connected as a driver (hexplan.discover.connect keeps it on loopback)."""
    with loopback_ray({"hexplan_node:a": 1}, {"hexplan_node:b": 1}) as c:
        yield c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ray-ckpt") / "ckpt", layers=4, seed=5)


def hexplan_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "hexplan"]


# ---- discover -------------------------------------------------------------------------------

def test_discover_writes_a_valid_cluster_yaml(cluster, tmp_path, capsys):
    from hexplan.discover import discover

    text, facts = discover(cluster.address, probe_mb=1, probe_timeout=10)
    # probe actors ran on each raylet, on loopback
    assert sorted(facts["probes"]) == ["a", "b"]
    assert {w["host"] for w in facts["probes"].values()} == {"127.0.0.1"}
    assert {w["ray_ip"] for w in facts["probes"].values()} == {"127.0.0.1"}
    assert len({w["node_id"] for w in facts["probes"].values()}) == 2
    (link,) = facts["links"]
    assert link.bandwidth_Bps > 0 and 0 <= link.latency_s < 0.1
    assert "Written by `hexplan discover" in text and "UTC" in text and "FILL IN the GPU type" in text

    out = tmp_path / "cluster.yaml"
    assert main(["discover", "--ray", cluster.address, "-o", str(out), "--probe-mb", "1"]) == 0
    err = capsys.readouterr().err
    assert "hexplan: cluster written to" in err and "note: node a (127.0.0.1): FILL IN" in err
    c = load_cluster(str(out))
    assert [n.name for n in c.nodes] == ["a", "b"] and c.coordinator == "a"
    assert {n.gpu.name for n in c.nodes} == {"cpu"} and [n.count for n in c.nodes] == [1, 1]
    assert [n.address for n in c.nodes] == ["127.0.0.1:50061", "127.0.0.1:50062"]
    assert c.link("a", "b").bandwidth > 0
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("address, want", [("nonsense", "--ray: expected the Ray cluster's HOST:PORT"),
                                           ("127.0.0.1:1", "--ray: no Ray cluster answers at 127.0.0.1:1")])
def test_discover_errors_are_one_line(address, want, capsys):
    assert main(["discover", "--ray", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hexplan: error: {want}") and len(err.splitlines()) == 1


def test_discover_refuses_a_server_that_is_not_ray(capsys):
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        assert main(["discover", "--ray", address]) == 2       # at once, not after ray.init's retries
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert err == f"hexplan: error: --ray: {address} answers but is not a Ray cluster's GCS (it does not speak gRPC)\n"


def test_discover_regions_by_latency():
    from hexplan.discover import Link, read_nodes, regions

    links = [Link("a", "b", 0.0001, 1e9, 0, 0, 1), Link("a", "c", 0.030, 1e8, 0, 0, 1),
             Link("b", "c", 0.031, 1e8, 0, 0, 1)]
    assert regions(["a", "b", "c"], links, 0.002) == {"a": "region0", "b": "region0", "c": "region1"}
    assert regions(["a", "b", "c"], links, 0.050) == {}
    nodes = read_nodes([
        {"NodeID": "1" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerHostname": "gpu-box",
         "Resources": {"CPU": 8, "GPU": 4, "memory": 1e11, "accelerator_type:A100": 1,
                       "accelerator_type:A100-80G": 1}, "Labels": {}},
        {"NodeID": "2" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeManagerHostname": "gpu-box",
         "Resources": {"CPU": 8, "GPU": 2, "memory": 1e11, "accelerator_type:A100": 1}, "Labels": {}},
        {"NodeID": "3" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.3", "NodeManagerHostname": "l",
         "Resources": {"CPU": 8, "GPU": 1, "memory": 1e11}, "Labels": {"hexplan_gpu_type": "L4"}},
        {"NodeID": "4" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.4", "Resources": {}}])
    assert [(n.name, n.gpu, n.count, bool(n.note)) for n in nodes] == [
        ("gpu-box", "A100-80G", 4, False), ("gpu-box-2", "cpu", 2, True), ("l", "L4", 1, False)]


# ---- launch --ray ---------------------------------------------------------------------------

def test_place_pins_by_resource_then_ip_then_hostname():
    from hexplan.errors import SpecError
    from hexplan.executor.ray_cluster import place
    from hexplan.plan import plan_from_dict

    def node(i, ip, host, **res):
        return {"NodeID": str(i) * 56, "Alive": True, "NodeManagerAddress": ip, "NodeManagerHostname": host,
                "Resources": {"CPU": 1, **res}}
    stages = [{"node": n, "gpus": [0], "tp": 1, "layers": [0, 4]} for n in ("x", "y", "z")]
    pl = plan_from_dict({"model": "llama-2-7b", "pipelines": [{"weight": 1.0, "stages": [s]} for s in stages],
                         "cluster": {"nodes": [{"name": "y", "gpu": "cpu", "count": 1, "address": "10.0.0.2:50061"}]}})
    nodes = [node(1, "10.0.0.1", "h1", **{"hexplan_node:x": 1}), node(2, "10.0.0.2", "h2"), node(3, "10.0.0.3", "z")]
    got = place(pl, nodes)
    assert {n: (rn["NodeID"][0], pin) for n, (rn, pin) in got.items()} == {
        "x": ("1", "resource"), "y": ("2", "node_id"), "z": ("3", "node_id")}
    with pytest.raises(SpecError, match="plan node z: no Ray node has the resource hexplan_node:z"):
        place(pl, nodes[:2])


PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7], [200, 100], [42] * 9]


def test_launch_on_ray_is_token_identical_and_survives_a_killed_executor(cluster, ckpt):
    from hexplan.executor.client import generate
    from hexplan.executor.ray_cluster import RayLaunch

    pl = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)])
    with RayLaunch(pl, ckpt, cluster.address, threads=1) as L:
        L.gateway.recovery_wait_s = 120           # a restart imports torch twice on a busy 2-core machine
        # each executor is an actor on its own raylet, listening on loopback
        assert {n: i["ray_ip"] for n, i in L.info.items()} == {"a": "127.0.0.1", "b": "127.0.0.1"}
        assert all(i["address"].startswith("127.0.0.1:") for i in L.info.values())
        assert L.info["a"]["node_id"] != L.info["b"]["node_id"]
        # the token reached the executor in its environment, never on a command line
        with open(f"/proc/{L.info['b']['node_pid']}/cmdline", "rb") as f:
            assert L.auth_token.encode() not in f.read()
        assert sorted(hexplan_actors()) == sorted(f"hexplan-{L.tag}-{n}" for n in "ab")

        got = generate(L.address, token_ids=PROMPTS[0], max_new_tokens=8, timeout=60)
        assert got["token_ids"] == hf_greedy(ckpt, PROMPTS[0], 8)

        # kill b's actor with requests in flight: Ray restarts it at the same address, the
        # gateway reloads the pipeline, every request completes with the same tokens
        old_pid = L.info["b"]["pid"]
        epoch = L.gateway.pipelines[0].epoch
        n = 120
        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            fs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=150) for p in PROMPTS]
            wait_for(lambda: L.gateway.in_flight() == len(PROMPTS), 30, "requests in flight")
            L.kill_node("b")
            res = [f.result(timeout=160) for f in fs]
        for p, r in zip(PROMPTS, res):
            assert r["token_ids"] == hf_greedy(ckpt, p, n)
        wait_for(lambda: all(p.alive for p in L.gateway.pipelines), 60, "the pipeline back")
        assert L.gateway.pipelines[0].epoch >= epoch + 2          # it went down and came back
        info = ray.get(L.actors["b"].info.remote(), timeout=60)
        assert info["pid"] != old_pid and info["address"] == L.info["b"]["address"]
        assert ray.get(L.actors["b"].info.remote(), timeout=10)["ray_ip"] == "127.0.0.1"
    assert hexplan_actors() == []


def test_launch_names_a_plan_node_ray_does_not_have(cluster, ckpt, capsys, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n      - {{node: zz, gpus: [0], tp: 1, layers: [0, 4]}}\n")
    assert main(["launch", str(plan_file), "--checkpoint", ckpt, "--ray", cluster.address, "--listen",
                 "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hexplan: error: --ray: plan node zz: no Ray node has the resource hexplan_node:zz")
    assert len(err.splitlines()) == 1 and hexplan_actors() == []


def test_discover_solve_launch_cli_serves_and_drains_on_sigterm(cluster, ckpt, tmp_path, capsys):
    """The whole flow: discover, solve on what it wrote, `hexplan launch --ray` (a process of its
    own, joining the cluster as a second driver), requests, SIGTERM."""
    from hexplan.executor.client import generate

    spec, plan_file = tmp_path / "cluster.yaml", tmp_path / "plan.yaml"
    assert main(["discover", "--ray", cluster.address, "-o", str(spec), "--probe-mb", "1"]) == 0
    assert main(["solve", str(spec), "--model", f"{ckpt}/config.json", "-o", str(plan_file), "--time-limit", "5",
                 "-q"]) == 0
    capsys.readouterr()
    proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "launch", str(plan_file), "--checkpoint", ckpt,
                             "--ray", cluster.address, "--listen", "127.0.0.1:0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=90)
        assert lines and lines[0].startswith("hexplan: ready: serving"), (lines, proc.poll())
        assert "node executor(s) on Ray: a@127.0.0.1:" in lines[0] and ", b@127.0.0.1:" in lines[0]
        address = lines[0].split(" on ")[1].split()[0]
        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            res = list(pool.map(lambda p: generate(address, token_ids=p, max_new_tokens=6, timeout=60), PROMPTS))
        for p, r in zip(PROMPTS, res):
            assert r["token_ids"] == hf_greedy(ckpt, p, 6)
        assert len(hexplan_actors()) == 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip().endswith("hexplan: stopped")
        wait_for(lambda: hexplan_actors() == [], 20, "the actors to go")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
