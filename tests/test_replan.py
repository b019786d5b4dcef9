"""Re-plan with no restart (issue 15, executor/hexplan/executor/replan.py), without Ray: two local
`hexplan node` processes (hexplan launch's), a plan change made directly and one triggered by a
node that stops answering. Greedy tokens are checked against transformers; every request sent
during a change must complete exactly once. The Ray tests (a raylet joins, one leaves) are in
tests/test_ray.py."""
from __future__ import annotations

import io
import time
from concurrent import futures

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import RAY_NODE as NODE  # noqa: E402
from executor_util import hf_greedy, loopback_ray, make_checkpoint, plan, wait_for  # noqa: E402

from hexplan.cluster import loads_cluster  # noqa: E402
from hexplan.executor.sampling import Sampling  # noqa: E402

PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7], [200, 100], [42] * 9]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("replan-ckpt") / "ckpt", layers=4, seed=7)


def cpu_cluster(addresses: dict):
    """A cluster file of CPU workers at these executor addresses ({name: HOST:PORT})."""
    nodes = "\n".join(f"  - {{name: {n}, gpu: cpu, count: 1, address: \"{a}\"}}" for n, a in addresses.items())
    return loads_cluster(f"name: local\nnodes:\n{nodes}\nnetwork:\n  default: {{bandwidth: 1GB/s, latency: 0.1ms}}\n")


def node_stages(gw, name: str) -> list[str]:
    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    return list(gw.stub(gw.node_addresses[name]).Stats(pb.StatsRequest(), timeout=10).stages)


def test_switch_keeps_every_request_and_moves_traffic(ckpt):
    """A two-stage pipeline (a, b) replaced by two one-stage replicas (a), (b) while requests
    stream: the old requests finish on the old pipeline, new ones go to the new pipelines, the old
    shards are unloaded, every output is transformers' greedy output."""
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch
    from hexplan.executor.replan import ProbedNodes, ReplanOptions, Replanner

    p0 = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)])
    p1 = plan(ckpt, [("a", 1, 0, 4)], [("b", 1, 0, 4)])
    err = io.StringIO()
    with Launch(p0, ckpt, threads=1) as L:
        gw = L.gateway
        addrs = {n: a for n, (_, a) in L.nodes.items()}
        rp = Replanner(gw, cpu_cluster(addrs), ProbedNodes(gw, addrs), ReplanOptions(margin=0.0), err=err)
        assert sorted(node_stages(gw, "a") + node_stages(gw, "b")) == ["p0s0", "p0s1"]
        n = 40
        with futures.ThreadPoolExecutor(8) as pool:
            before = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=120) for p in PROMPTS]
            wait_for(lambda: gw.in_flight() == len(PROMPTS), 30, "requests in flight")
            ev = rp.replan("test", plan=p1)
            assert ev.switched and ev.loaded == 2 and ev.kept == 0 and ev.replaced == 1, (ev, err.getvalue())
            assert [p.state for p in gw.pipelines][1:] == ["live", "live"]
            after = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=8, timeout=120) for p in PROMPTS]
            res_before = [f.result(timeout=150) for f in before]
            res_after = [f.result(timeout=150) for f in after]
        for p, r in zip(PROMPTS, res_before):
            assert r["token_ids"] == hf_greedy(ckpt, p, n)
        for p, r in zip(PROMPTS, res_after):
            assert r["token_ids"] == hf_greedy(ckpt, p, 8)
        # pinned: the old requests stayed where they started; the new ones all went to the new pipelines
        assert gw.pipelines[0].served == len(PROMPTS)
        assert gw.pipelines[1].served + gw.pipelines[2].served == len(PROMPTS)
        assert gw.pipelines[1].served > 0 and gw.pipelines[2].served > 0
        wait_for(lambda: ev.drain_s is not None, 30, "the old pipeline retired")
        assert gw.pipelines[0].state == "retired" and ev.moved == 0
        assert node_stages(gw, "a") == ["g1p0s0"] and node_stages(gw, "b") == ["g1p1s0"]
        assert gw.in_flight() == 0
        line = err.getvalue().strip()
        assert line.startswith("hexplan: re-plan (test): switched to generation 1: predicted ")
        assert "solve " in line and "load " in line and "switch " in line and len(line.splitlines()) == 1


def test_a_node_gone_past_the_grace_period_is_planned_around(ckpt):
    """Two replicas (a), (b); b's executor dies for good while requests stream: they fail over to
    a (faults.py), the watcher sees b silent past the grace period, the solver plans on a alone
    (the replica on a is kept, nothing to load) and b's pipeline is retired."""
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch
    from hexplan.executor.replan import ProbedNodes, ReplanOptions, Replanner

    p0 = plan(ckpt, [("a", 1, 0, 4)], [("b", 1, 0, 4)])
    err = io.StringIO()
    with Launch(p0, ckpt, threads=1) as L:
        gw = L.gateway
        addrs = {n: a for n, (_, a) in L.nodes.items()}
        rp = Replanner(gw, cpu_cluster(addrs), ProbedNodes(gw, addrs),
                       ReplanOptions(poll_s=0.3, grace_s=1.0, time_limit_s=3.0), err=err)
        rp.start()
        n = 60
        with futures.ThreadPoolExecutor(8) as pool:
            fs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=120) for p in PROMPTS]
            wait_for(lambda: gw.in_flight() == len(PROMPTS), 30, "requests in flight")
            t_kill = time.monotonic()
            L.node_process("b").kill()
            wait_for(lambda: rp.events, 60, "a re-plan")
            res = [f.result(timeout=150) for f in fs]
        for p, r in zip(PROMPTS, res):
            assert r["token_ids"] == hf_greedy(ckpt, p, n)
        ev = rp.events[0]
        assert ev.reason == "left: b" and ev.switched, (ev, err.getvalue())
        assert ev.t_detect - t_kill >= 1.0                     # the grace period
        assert ev.kept == 1 and ev.loaded == 0 and gw.pipelines[1].state == "retired"
        assert [s.node for p in gw.plan.pipelines for s in p.stages] == ["a"]
        # the next requests go to a
        got = generate(L.address, token_ids=PROMPTS[0], max_new_tokens=5, timeout=60)
        assert got["token_ids"] == hf_greedy(ckpt, PROMPTS[0], 5)
        assert "re-plan (left: b): switched" in err.getvalue()
        # solving again on the same nodes finds nothing better by the margin: nothing changes
        ev2 = rp.replan("asked")
        assert not ev2.switched and ev2.new_tps < 1.05 * ev2.old_tps and len(gw.pipelines) == 2
        assert "re-plan (asked): kept the current plan (the new one predicts" in err.getvalue()
        rp.stop(timeout=1)


def test_serve_replan_cli_uses_a_node_that_starts_answering(ckpt, tmp_path):
    """`hexplan serve --replan --cluster FILE` without Ray: node b of the cluster file is not
    running at start; once its `hexplan node` answers, the gateway plans on a and b, loads a
    replica on b and switches, printing the one line on stderr; requests stay token-identical."""
    import signal
    import subprocess
    import sys
    import threading

    from executor_util import free_port

    from hexplan.executor.client import generate
    from hexplan.executor.launch import start_node

    token = "replan-test-token"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    port_b = free_port()
    a_proc, a_addr = start_node("a", "127.0.0.1", 1, None, token, checkpoint_root=ckpt)
    b_proc = None
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"name: two\nnodes:\n  - {{name: a, gpu: cpu, count: 1, address: \"{a_addr}\"}}\n"
                       f"  - {{name: b, gpu: cpu, count: 1, address: \"127.0.0.1:{port_b}\"}}\n"
                       "network:\n  default: {bandwidth: 1GB/s, latency: 0.1ms}\n")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan(ckpt, [("a", 1, 0, 4)]).dump("yaml"))
    proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "serve", "--plan", str(plan_file), "--checkpoint",
                             ckpt, "--listen", "127.0.0.1:0", "--auth-token-file", str(tmp_path / "token"),
                             "--replan", "--cluster", str(cluster), "--replan-poll", "0.3", "--replan-grace", "1",
                             "--replan-time-limit", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines, errs = [], []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: errs.extend(proc.stderr), daemon=True).start()
        wait_for(lambda: lines or proc.poll() is not None, 90, "the ready line")
        assert lines and lines[0].startswith("hexplan: ready: serving"), (lines, errs)
        address = lines[0].split(" on ")[1].split()[0].rstrip(";")
        assert generate(address, token_ids=PROMPTS[0], max_new_tokens=6, timeout=60)["token_ids"] == \
            hf_greedy(ckpt, PROMPTS[0], 6)
        b_proc, _ = start_node("b", "127.0.0.1", 1, None, token, checkpoint_root=ckpt, port=port_b)
        wait_for(lambda: any("re-plan (joined: b)" in e for e in errs), 90, "the re-plan line")
        (line,) = [e for e in errs if "re-plan (joined: b)" in e]
        assert " INFO hexplan.replan: re-plan (joined: b): switched to generation 1: predicted " in line, line
        assert "1 pipeline(s) kept, 1 loaded, 0 draining" in line
        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            res = list(pool.map(lambda p: generate(address, token_ids=p, max_new_tokens=6, timeout=60), PROMPTS))
        for p, r in zip(PROMPTS, res):
            assert r["token_ids"] == hf_greedy(ckpt, p, 6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for pr in (proc, a_proc, b_proc):
            if pr is not None and pr.poll() is None:
                pr.kill()
                pr.wait(timeout=10)


@pytest.mark.parametrize("argv, want", [
    (["launch", "{plan}", "--checkpoint", "{ckpt}", "--replan"], "--replan: needs --ray: a local launch has no other"),
    (["serve", "--plan", "{plan}", "--checkpoint", "{ckpt}", "--replan"], "--cluster: --replan needs the cluster to plan on"),
    (["serve", "--plan", "{plan}", "--checkpoint", "{ckpt}", "--cluster", "{plan}"], "--cluster: only with --replan"),
    (["serve", "--plan", "{plan}", "--checkpoint", "{ckpt}", "--replan", "--replan-margin", "-1"],
     "--replan-margin: must be a number >= 0, got -1"),
    (["serve", "--plan", "{plan}", "--checkpoint", "{ckpt}", "--replan", "--replan-poll", "0"],
     "--replan-poll: must be a number > 0, got 0"),
])
def test_replan_cli_errors_are_one_line(argv, want, ckpt, tmp_path, capsys):
    from hexplan.cli import main

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n      - {{node: a, gpus: [0], tp: 1, layers: [0, 4]}}\n")
    assert main([a.format(plan=plan_file, ckpt=ckpt) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hexplan: error: {want}") and len(err.splitlines()) == 1, err


# ---- on Ray: a raylet joins, one leaves ------------------------------------------------------


@pytest.fixture
def ray_cluster():
    """A fresh loopback Ray cluster per test (head: hexplan_node:a); this process is its driver."""
    pytest.importorskip("ray")
    with loopback_ray({"hexplan_node:a": 1}) as c:
        yield c


def tokens_of(req, timeout: float = 240.0) -> list[int]:
    """The tokens a request submitted with Gateway.submit streams, once it is done (exactly once:
    a repeated or lost token would show against the reference)."""
    out, deadline = [], time.monotonic() + timeout
    while True:
        kind, *rest = req.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if kind == "tokens":
            out += rest[0]
        elif kind == "done":
            return out
        else:
            raise AssertionError(f"request ended with {kind}: {rest}")


def _stream(address, prompts, n, pool):
    from hexplan.executor.client import generate
    return [pool.submit(generate, address, token_ids=p, max_new_tokens=n, timeout=240) for p in prompts]


def test_ray_a_raylet_joins_and_traffic_moves_onto_it(ray_cluster, ckpt):
    import ray

    from hexplan.executor.ray_cluster import RayLaunch
    from hexplan.executor.replan import ReplanOptions

    p0 = plan(ckpt, [("a", 1, 0, 4)])
    err = io.StringIO()
    opts = ReplanOptions(poll_s=0.5, grace_s=2.0, time_limit_s=3.0)
    with RayLaunch(p0, ckpt, ray_cluster.address, threads=1, replan=opts) as L:
        rp = L.replanner
        rp.err = err
        assert rp.members == {"a"} and [n.name for n in rp.cluster.nodes] == ["a"]
        n = 60
        with futures.ThreadPoolExecutor(8) as pool:
            before = _stream(L.address, PROMPTS, n, pool)
            wait_for(lambda: L.gateway.in_flight() == len(PROMPTS), 30, "requests in flight")
            ray_cluster.add_node(**NODE, resources={"hexplan_node:c": 1})
            wait_for(lambda: rp.events and rp.events[-1].switched, 120, f"a re-plan onto c ({err.getvalue()})")
            ev = rp.events[-1]
            assert ev.reason == "joined: c" and ev.kept == 1 and ev.loaded == 1, (ev, err.getvalue())
            # A burst, submitted at once: routing (shortest expected delay, hexplan.dispatch) sends
            # requests to a until its queue outweighs c's longer expected latency (c is one network
            # hop from the gateway), then to c as well.
            gw = L.gateway
            burst = PROMPTS * 12
            reqs = [gw.submit(p, Sampling(max_new_tokens=6)) for p in burst]
            res_before = [f.result(timeout=240) for f in before]
        for p, r in zip(PROMPTS, res_before):
            assert r["token_ids"] == hf_greedy(ckpt, p, n)
        for p, r in zip(burst, reqs):
            assert tokens_of(r) == hf_greedy(ckpt, p, 6)
        new = gw.pipelines[1]
        assert new.nodes == ["c"] and new.generation == 1 and new.state == "live"
        assert new.served > 0 and gw.pipelines[0].served + new.served == len(PROMPTS) + len(burst), \
            [p.served for p in gw.pipelines]
        # c's executor is a Ray actor on the new raylet, on loopback
        info = ray.get(L.actors["c"].info.remote(), timeout=30)
        assert info["ray_ip"] == "127.0.0.1" and info["address"].startswith("127.0.0.1:")
        assert node_stages(gw, "c") == ["g1p1s0"] and node_stages(gw, "a") == ["p0s0"]
        assert ev.new_tps > ev.old_tps * 1.05
        assert "re-plan (joined: c): switched to generation 1" in err.getvalue()


def test_ray_a_raylet_leaves_and_the_gateway_replans_around_it(ray_cluster, ckpt):
    from hexplan.executor.ray_cluster import RayLaunch
    from hexplan.executor.replan import ReplanOptions

    node_b = ray_cluster.add_node(**NODE, resources={"hexplan_node:b": 1})
    ray_cluster.wait_for_nodes(timeout=60)
    p0 = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)])
    err = io.StringIO()
    opts = ReplanOptions(poll_s=0.5, grace_s=1.0, time_limit_s=3.0)
    with RayLaunch(p0, ckpt, ray_cluster.address, threads=1, replan=opts) as L:
        gw = L.gateway
        gw.recovery_wait_s = 180          # parked while b is gone and a's new shard loads
        rp = L.replanner
        rp.err = err
        n = 60
        with futures.ThreadPoolExecutor(8) as pool:
            fs = _stream(L.address, PROMPTS, n, pool)
            wait_for(lambda: gw.in_flight() == len(PROMPTS), 30, "requests in flight")
            ray_cluster.remove_node(node_b)
            wait_for(lambda: rp.events and rp.events[-1].switched, 120, f"a re-plan around b ({err.getvalue()})")
            ev = rp.events[-1]
            assert ev.reason == "left: b" and ev.loaded == 1 and ev.kept == 0, (ev, err.getvalue())
            res = [f.result(timeout=240) for f in fs]
        for p, r in zip(PROMPTS, res):
            assert r["token_ids"] == hf_greedy(ckpt, p, n)
        new = gw.pipelines[1]
        assert new.nodes == ["a"] and new.served >= len(PROMPTS) and new.state == "live"
        wait_for(lambda: gw.pipelines[0].state == "retired", 30, "the old pipeline retired")
        wait_for(lambda: ev.drain_s is not None, 30, "the drain")
        assert node_stages(gw, "a") == ["g1p0s0"] and "b" not in L.actors
        got = _stream(L.address, [PROMPTS[1]], 6, futures.ThreadPoolExecutor(1))[0].result(timeout=60)
        assert got["token_ids"] == hf_greedy(ckpt, PROMPTS[1], 6)
        assert "re-plan (left: b): switched to generation 1" in err.getvalue()
