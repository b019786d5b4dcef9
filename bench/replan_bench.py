"""Re-plan under steady load (issue 15): a node leaves, then a node joins, a local Ray cluster
while clients stream greedy requests; the gateway re-plans with no restart (replan.py).

    python bench/replan_bench.py [--streams 4] [--phase 20] [--max-new 16] [--json FILE]

Setup: ``ray.cluster_utils.Cluster`` on 127.0.0.1 (every raylet ``node_ip_address="127.0.0.1"``,
1 CPU each), head raylet ``hexplan_node:a`` and a raylet ``hexplan_node:b``; a tiny random Llama
(``--layers`` layers, hidden 128) in a temporary directory; ``RayLaunch`` with ``replan`` on a
plan of one pipeline a -> b (layers split in two). ``--streams`` client threads send greedy
requests back to back (prompts from a seeded pool of 8, ``--max-new`` tokens each) over gRPC.

Timeline: ``--phase`` seconds of steady load (before); raylet b removed (leave: the pipeline
loses its node, requests wait parked, the watcher sees b gone past ``--grace`` s, the solver plans
on a alone, a's new shard loads, routing switches); ``--phase`` s (after leave); raylet c added
(join: the solver plans replicas on a and c, c's executor actor starts, its shard loads, routing
switches); ``--phase`` s (after join). Then the clients stop and every request is checked against
transformers' greedy tokens.

Per change: detect (the change to the re-plan's start; a leave's includes --grace and Ray's own
death detection), solve, load (a join's includes starting c's executor actor), switch (routing,
under the gateway's lock), change->switched (end to end), and the replaced pipelines' drain.
Throughput is output tokens streamed per second (by arrival) in each window: before, during
(change -> switched), after. Requests lost: failed, wrong or missing tokens (target 0).
Tables on stdout, progress on stderr.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # this checkout's hexplan, and the test helpers

from executor_util import hf_greedy, make_checkpoint, plan  # noqa: E402

NODE = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)


def log(msg: str) -> None:
    print(f"[replan_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Load:
    """Client threads sending greedy requests back to back; token arrival times recorded."""

    def __init__(self, address: str, prompts: list, max_new: int, streams: int):
        self.address, self.prompts, self.max_new = address, prompts, max_new
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, int]] = []    # (time, tokens)
        self.records: list[dict] = []                    # one per request
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(streams)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self, timeout: float = 300):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=timeout)

    def run(self, i: int) -> None:
        from hexplan.executor.client import generate

        rng = random.Random(i)
        while not self.stop.is_set():
            k = rng.randrange(len(self.prompts))
            rec = {"prompt": k, "t0": time.monotonic(), "tokens": [], "error": None}

            def on_tokens(ids, _text):
                now = time.monotonic()
                with self.lock:
                    self.arrivals.append((now, len(ids)))
            try:
                r = generate(self.address, token_ids=self.prompts[k], max_new_tokens=self.max_new, timeout=300,
                             on_tokens=on_tokens)
                rec["tokens"] = r["token_ids"]
            except Exception as e:       # grpc.RpcError: a failed request (counted as lost)
                rec["error"] = f"{type(e).__name__}: {e.details() if hasattr(e, 'details') else e}"
            rec["t1"] = time.monotonic()
            with self.lock:
                self.records.append(rec)

    def rate(self, t0: float, t1: float) -> float:
        with self.lock:
            n = sum(k for t, k in self.arrivals if t0 <= t < t1)
        return n / (t1 - t0) if t1 > t0 else 0.0


def wait_switch(rp, count: int, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [e for e in rp.events if e.switched]
        if len(done) >= count:
            return done[count - 1]
        time.sleep(0.1)
    raise SystemExit(f"no re-plan switch within {timeout} s: {rp.events}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds of steady load per phase (default 20)")
    ap.add_argument("--max-new", type=int, default=16, help="tokens per request (default 16)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the tiny model (default 4)")
    ap.add_argument("--grace", type=float, default=2.0, help="--replan-grace seconds (default 2)")
    ap.add_argument("--poll", type=float, default=0.5, help="--replan-poll seconds (default 0.5)")
    ap.add_argument("--time-limit", type=float, default=5.0, help="--replan-time-limit seconds (default 5)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from hexplan.discover import connect
    from hexplan.executor.ray_cluster import RayLaunch
    from hexplan.executor.replan import ReplanOptions

    tmp = tempfile.TemporaryDirectory(prefix="replan-bench-")
    ckpt = make_checkpoint(Path(tmp.name) / "ckpt", layers=args.layers, hidden=128, intermediate=256, seed=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    refs = [hf_greedy(ckpt, p, args.max_new) for p in prompts]
    half = args.layers // 2
    p0 = plan(ckpt, [("a", 1, 0, half), ("b", 1, half, args.layers)])
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False,
                                                          resources={"hexplan_node:a": 1}))
    out = {}
    try:
        node_b = c.add_node(**NODE, resources={"hexplan_node:b": 1})
        c.wait_for_nodes(timeout=60)
        assert connect(c.address)
        opts = ReplanOptions(poll_s=args.poll, grace_s=args.grace, time_limit_s=args.time_limit)
        with RayLaunch(p0, ckpt, c.address, threads=1, replan=opts) as L:
            L.gateway.recovery_wait_s = 300
            rp = L.replanner
            rp.err = io.StringIO()
            load = Load(L.address, prompts, args.max_new, args.streams)
            log(f"serving on {L.address}; {args.streams} streams for {args.phase:g} s (before)")
            t_start = time.monotonic()
            load.start()
            time.sleep(args.phase)
            t_leave = time.monotonic()
            log("removing raylet b")
            c.remove_node(node_b)
            ev_leave = wait_switch(rp, 1, 300)
            log(f"switched after the leave ({ev_leave.t_switched - t_leave:.1f} s); {args.phase:g} s (after leave)")
            time.sleep(args.phase)
            t_join = time.monotonic()
            log("adding raylet c")
            c.add_node(**NODE, resources={"hexplan_node:c": 1})
            ev_join = wait_switch(rp, 2, 300)
            log(f"switched after the join ({ev_join.t_switched - t_join:.1f} s); {args.phase:g} s (after join)")
            time.sleep(args.phase)
            t_end = time.monotonic()
            load.finish()
            for e in (ev_leave, ev_join):
                deadline = time.monotonic() + 60
                while e.drain_s is None and time.monotonic() < deadline:
                    time.sleep(0.1)
            served = [(p.index, "+".join(p.nodes), p.state, p.served) for p in L.gateway.pipelines]
            lines = rp.err.getvalue().strip().splitlines()
    finally:
        ray.shutdown()
        c.shutdown()

    recs = load.records
    failed = [r for r in recs if r["error"]]
    wrong = [r for r in recs if not r["error"] and r["tokens"] != refs[r["prompt"]]]
    windows = [("before", t_start, t_leave), ("leave: during", t_leave, ev_leave.t_switched),
               ("leave: after", ev_leave.t_switched, t_join), ("join: during", t_join, ev_join.t_switched),
               ("join: after", ev_join.t_switched, t_end)]
    print(f"\nRe-plan under load: {args.streams} greedy streams, {args.max_new} tokens per request, "
          f"{args.layers}-layer tiny Llama, CPU, local Ray cluster (grace {args.grace:g} s, poll {args.poll:g} s)\n")
    print("| change | detect s | solve s | load s | switch ms | change->switched s | drain s "
          "| predicted tok/s old -> new | pipelines kept / loaded / replaced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t, e in (("b leaves", t_leave, ev_leave), ("c joins", t_join, ev_join)):
        print(f"| {name} | {e.t_detect - t:.2f} | {e.solve_s:.2f} | {e.load_s:.2f} | {e.switch_s * 1e3:.2f} | "
              f"{e.t_switched - t:.2f} | {e.drain_s if e.drain_s is not None else float('nan'):.2f} | "
              f"{e.old_tps:.0f} -> {e.new_tps:.0f} | {e.kept} / {e.loaded} / {e.replaced} |")
    print("\n| window | seconds | measured output tok/s |")
    print("|---|---|---|")
    for name, a, b in windows:
        print(f"| {name} | {b - a:.1f} | {load.rate(a, b):.1f} |")
    print(f"\nRequests: {len(recs)} completed or failed; lost (failed or wrong tokens): {len(failed) + len(wrong)} "
          f"({len(failed)} failed, {len(wrong)} wrong)")
    print("Pipelines at the end (index, nodes, state, requests routed): "
          + "; ".join(f"{i} {n} {s} {k}" for i, n, s, k in served))
    print("Re-plan lines:\n" + "\n".join("  " + x for x in lines))
    for r in failed[:5]:
        print(f"  failed: {r['error']}")
    if args.json:
        out = {"args": vars(args), "requests": len(recs), "failed": len(failed), "wrong": len(wrong),
               "changes": [{"change": n, "detect_s": e.t_detect - t, "solve_s": e.solve_s, "load_s": e.load_s,
                            "switch_s": e.switch_s, "to_switched_s": e.t_switched - t, "drain_s": e.drain_s,
                            "old_tps": e.old_tps, "new_tps": e.new_tps}
                           for n, t, e in (("leave", t_leave, ev_leave), ("join", t_join, ev_join))],
               "windows": [{"window": n, "seconds": b - a, "tokens_per_s": load.rate(a, b)} for n, a, b in windows]}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if not failed and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
