"""Chaos: many greedy streams against a two-pipeline plan while nodes are killed, stalled and
restarted, with bad requests mixed in. Every stream must either complete with transformers'
exact tokens or fail with a clear status; nothing lost, nothing duplicated; KV back to 0.

    python bench/chaos_bench.py [--seconds 60] [--streams 200] [--seed 0] [--json FILE]

A tiny random GQA Llama (4 layers) is written to a temporary directory (or --checkpoint), and
`hexplan launch`'s Launch starts four node executors: pipeline 0 on nodes a -> b, pipeline 1 on
c -> d. ``--streams`` client threads each send greedy requests back to back for ``--seconds``
(prompts from a seeded pool, 4-32 new tokens); one request in ten is bad (a token id outside
the vocabulary, max_new_tokens 0, top_p 2, or temperature 1e-40, which is valid and must
complete as greedy), and every request carries one of eight shared labels as its request_id.
Meanwhile a seeded schedule, one event every ``--every`` seconds, picks a node and either
SIGKILLs it (restarted at the same address ``--down`` seconds later) or SIGSTOPs its stage
workers for ``--down`` seconds (the gateway's stall timeout is set to ``--stall`` seconds).

Each stream is classed:
  identical   completed, its tokens equal transformers' greedy tokens
  wrong       completed with other tokens (counts as a failure)
  duplicated  more tokens than asked for (a token streamed twice)
  lost        ended with no finish reason and no error status
  cut         failed with an error after tokens had been streamed
  refused     failed with an error before any token (UNAVAILABLE while no pipeline is live,
              INVALID_ARGUMENT for a bad request: "expected" when the request was bad)
The check passes when lost = duplicated = wrong = 0, every bad request is refused with
INVALID_ARGUMENT naming its field, and every stage's KV is back to 0 at the end. Tables on
stdout, progress on stderr; exit status 1 when the check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # this checkout's hexplan, and the test helpers

import grpc  # noqa: E402

from executor_util import children, hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402
from hexplan.executor.wire import channel  # noqa: E402

VOCAB = 256
MAX_NEW = 32
LABELS = [f"client-{i}" for i in range(8)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


BAD = [  # (field the refusal must name, how to spoil a request)
    ("token_ids", lambda r: r.token_ids.append(VOCAB + 7)),
    ("sampling.max_new_tokens", lambda r: setattr(r.sampling, "max_new_tokens", 0)),
    ("sampling.top_p", lambda r: setattr(r.sampling, "top_p", 2.0)),
]


class Client(threading.Thread):
    def __init__(self, idx, address, prompts, stop_at, seed, records, lock):
        super().__init__(daemon=True, name=f"client{idx}")
        self.address, self.prompts, self.stop_at = address, prompts, stop_at
        self.rng = random.Random(seed)
        self.records, self.lock = records, lock

    def run(self):
        with channel(self.address, None) as ch:
            stub = pbg.InferenceStub(ch)
            while time.monotonic() < self.stop_at:
                self.one(stub)

    def one(self, stub):
        rng = self.rng
        pi = rng.randrange(len(self.prompts))
        n = rng.randint(4, MAX_NEW)
        req = pb.GenerateRequest(token_ids=self.prompts[pi], request_id=rng.choice(LABELS),
                                 sampling=pb.SamplingParams(max_new_tokens=n))
        kind, field = "good", ""
        x = rng.random()
        if x < 0.075:
            field, spoil = rng.choice(BAD)
            spoil(req)
            kind = "bad"
        elif x < 0.1:
            req.sampling.temperature = 1e-40
            req.sampling.seed = rng.randrange(1 << 30)
            kind = "tiny-temperature"
        rec = {"prompt": pi, "n": n, "kind": kind, "field": field, "tokens": [],
               "finish": "", "code": "", "details": "", "t0": time.monotonic(), "t1": None}
        try:
            for msg in stub.Generate(req, timeout=300):
                rec["tokens"] += list(msg.token_ids)
                if msg.finish_reason:
                    rec["finish"] = msg.finish_reason
        except grpc.RpcError as e:
            rec["code"], rec["details"] = e.code().name, e.details() or ""
        rec["t1"] = time.monotonic()
        with self.lock:
            self.records.append(rec)
        if rec["code"] == "UNAVAILABLE":
            time.sleep(0.25)        # as a client would: back off before trying again


class Chaos(threading.Thread):
    """The seeded schedule of node faults."""

    def __init__(self, launch, stop_at, every, down, seed):
        super().__init__(daemon=True, name="chaos")
        self.L, self.stop_at, self.every, self.down = launch, stop_at, every, down
        self.rng = random.Random(seed)
        self.events: list = []
        self.stopped: list = []

    def run(self):
        L = self.L
        names = sorted(L.nodes)
        while time.monotonic() + self.every + self.down < self.stop_at:
            time.sleep(self.every)
            node = self.rng.choice(names)
            what = self.rng.choice(["kill", "stop"])
            t = time.monotonic()
            if what == "kill":
                log(f"chaos: SIGKILL node {node}")
                L.node_process(node).send_signal(signal.SIGKILL)
                time.sleep(self.down)
                log(f"chaos: restart node {node}")
                try:
                    L.restart_node(node)
                except Exception as e:   # noqa: BLE001 - the bench reports it
                    log(f"chaos: restart of {node} failed: {e}")
                    what = "kill (restart failed)"
            else:
                workers = children(L.node_process(node).pid)
                log(f"chaos: SIGSTOP node {node}'s workers {workers}")
                for w in workers:
                    os.kill(w, signal.SIGSTOP)
                self.stopped = workers
                time.sleep(self.down)
                for w in workers:
                    try:
                        os.kill(w, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                self.stopped = []
                log(f"chaos: SIGCONT node {node}'s workers")
            self.events.append({"t": round(t, 1), "node": node, "event": what})

    def release(self):
        for w in self.stopped:
            try:
                os.kill(w, signal.SIGCONT)
            except ProcessLookupError:
                pass


def classify(rec, refs) -> str:
    toks, n = rec["tokens"], rec["n"]
    if rec["code"]:
        return "cut" if toks else "refused"
    if len(toks) > n:
        return "duplicated"
    if rec["finish"] != "length" or len(toks) < n:
        return "lost"
    return "identical" if toks == refs[rec["prompt"]][:n] else "wrong"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=float, default=8.0, help="seconds between fault events (default 8)")
    ap.add_argument("--down", type=float, default=4.0, help="seconds a node stays killed or stopped (default 4)")
    ap.add_argument("--stall", type=float, default=2.0, help="the gateway's stall timeout floor, s (default 2)")
    ap.add_argument("--checkpoint", help="a checkpoint directory to use (default: a fresh tiny one)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="chaos.")
    ckpt = args.checkpoint or make_checkpoint(Path(tmp.name) / "ckpt", layers=4, heads=4, kv_heads=2, seed=11)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 24))] for _ in range(24)]
    log("references: transformers greedy for the prompt pool")
    refs = [hf_greedy(ckpt, p, MAX_NEW) for p in prompts]
    pl = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)], [("c", 1, 0, 2), ("d", 1, 2, 4)], weights=[0.5, 0.5])
    records: list = []
    lock = threading.Lock()
    log("launching 4 node executors and the gateway")
    with Launch(pl, ckpt, threads=1) as L:
        L.gateway.stall_timeout_s, L.gateway.stall_factor = args.stall, 5.0
        t0 = time.monotonic()
        stop_at = t0 + args.seconds
        clients = [Client(i, L.address, prompts, stop_at, args.seed * 100_003 + i, records, lock)
                   for i in range(args.streams)]
        chaos = Chaos(L, stop_at, args.every, args.down, args.seed)
        for c in clients:
            c.start()
        chaos.start()
        last = 0.0
        try:
            while any(c.is_alive() for c in clients) and time.monotonic() < stop_at + 300:
                time.sleep(1.0)
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    with lock:
                        done = len(records)
                    st = L.gateway.status()
                    log(f"{time.monotonic() - t0:5.0f} s: {done} requests ended, {st.in_flight} in flight, "
                        "pipelines " + ", ".join(f"{p.index}:{p.state}" for p in st.pipelines))
        finally:
            chaos.release()
        chaos.join(timeout=30)
        hung = sum(c.is_alive() for c in clients)
        # The end: every pipeline back, nothing in flight, every stage's KV at 0.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (L.gateway.in_flight() or
                                               not all(p.alive for p in L.gateway.pipelines)):
            time.sleep(0.5)
        time.sleep(1.0)
        kv = L.gateway.kv_stats()
        pipelines = [(p.index, p.state) for p in L.gateway.pipelines]
    elapsed = args.seconds
    good = [r for r in records if r["kind"] != "bad"]
    bad = [r for r in records if r["kind"] == "bad"]
    bad_ok = sum(1 for r in bad if r["code"] == "INVALID_ARGUMENT" and r["details"].startswith(r["field"]))
    good_classes = Counter(classify(r, refs) for r in good)
    codes = Counter(r["code"] for r in good if r["code"])
    lat = sorted(r["t1"] - r["t0"] for r in good if classify(r, refs) == "identical")
    kv_left = {a: v for a, v in kv.items() if v is None or v[1] != 0}
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    tokens = sum(len(r["tokens"]) for r in good if classify(r, refs) == "identical")
    ok = (good_classes["lost"] == good_classes["duplicated"] == good_classes["wrong"] == 0 and bad_ok == len(bad)
          and not kv_left and hung == 0)
    print(f"chaos: {args.streams} streams for {args.seconds:g} s, seed {args.seed}; "
          f"{len(chaos.events)} fault events: " + ", ".join(f"{e['event']} {e['node']}" for e in chaos.events))
    print()
    print("| requests | identical | wrong | duplicated | lost | cut | refused | bad refused by field | "
          "P50 latency s | P99 latency s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(good)} good + {len(bad)} bad | {good_classes['identical']} | {good_classes['wrong']} | "
          f"{good_classes['duplicated']} | {good_classes['lost']} | {good_classes['cut']} | {good_classes['refused']} | "
          f"{bad_ok}/{len(bad)} | {p(0.5):.2f} | {p(0.99):.2f} | {tokens / elapsed:.0f} |")
    print()
    print("errors of good requests: " + (", ".join(f"{k} {v}" for k, v in codes.most_common()) or "none"))
    print("pipelines at the end: " + ", ".join(f"{i}: {s}" for i, s in pipelines)
          + f"; KV left: {kv_left or 'none'}; clients still waiting: {hung}")
    print(f"check: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "events": chaos.events, "classes": dict(good_classes), "bad": len(bad),
            "bad_refused_by_field": bad_ok, "errors": dict(codes), "p50_s": p(0.5), "p99_s": p(0.99),
            "kv_left": {a: v for a, v in kv_left.items()}, "pipelines": pipelines, "pass": ok,
            "failures": [dict(r, ref=refs[r["prompt"]][:r["n"]]) for r in good
                         if classify(r, refs) in ("lost", "wrong", "duplicated", "cut")][:50]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
