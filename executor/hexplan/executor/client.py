"""``hexplan generate``: a small client for the gateway's Inference service."""
from __future__ import annotations

import json
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .wire import Tls, channel

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class WaitError(Exception):
    """The target did not serve ``Inference`` in time, or serves something else: the message says
    what it last answered."""


def wait_until_serving(target: str, wait_s: float, tls: Tls | None = None, on_waiting=None,
                       poll_s: float = 0.25) -> None:
    """Poll the target's gRPC health service (grpc.health.v1) until it reports the Inference
    service SERVING; raise WaitError when ``wait_s`` seconds pass first, or at once when the
    target answers but serves no Inference (a node executor, say). ``on_waiting(problem)`` is
    called once, when the first check finds it not serving yet. A fresh channel per check, so
    gRPC's reconnect backoff never stretches the gaps between checks."""
    deadline = time.monotonic() + wait_s
    req = health_pb2.HealthCheckRequest(service=INFERENCE)
    told = False
    while True:
        left = deadline - time.monotonic()
        try:
            with channel(target, tls) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(req, timeout=max(0.05, min(1.0, left)))
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
            problem = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise WaitError(f"{target} answers but does not serve {INFERENCE}: is it a node executor? "
                                "Give the gateway's address") from None
            problem = f"{e.code().name}: {' '.join((e.details() or '').split())}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitError(f"no gateway serving at {target} after {wait_s:g} s (last: {problem})")
        if not told and on_waiting is not None:
            on_waiting(problem)
            told = True
        time.sleep(min(poll_s, left))


def generate(target: str, *, prompt: str = "", token_ids=None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float | None = None, seed: int | None = None, stop_token_ids=(),
             tls: Tls | None = None, timeout: float | None = 600, on_tokens=None, request_id: str = "") -> dict:
    """Stream one generation; returns {"token_ids", "text", "finish_reason", "request_id"} (the
    label the gateway echoed: ``request_id``, else the gateway's own id)."""
    sampling = pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 stop_token_ids=list(stop_token_ids))
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(prompt=prompt, token_ids=list(token_ids or []), sampling=sampling, request_id=request_id)
    with channel(target, tls) as ch:
        stub = pbg.InferenceStub(ch)
        ids, text, reason, label = [], "", "", ""
        for msg in stub.Generate(req, timeout=timeout):
            label = label or msg.request_id
            ids += list(msg.token_ids)
            text += msg.text
            if on_tokens and msg.token_ids:
                on_tokens(list(msg.token_ids), msg.text)
            if msg.finish_reason:
                reason = msg.finish_reason
    return {"token_ids": ids, "text": text, "finish_reason": reason, "request_id": label}


def status(target: str, tls: Tls | None = None, timeout: float = 10) -> dict:
    """The gateway's Status as a plain dict (protobuf's JSON mapping, every field present)."""
    from google.protobuf.json_format import MessageToDict
    with channel(target, tls) as ch:
        out = pbg.InferenceStub(ch).Status(pb.StatusRequest(), timeout=timeout)
    return MessageToDict(out, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def run_status(args) -> int:
    """``hexplan status --target``: per pipeline, its state, requests in flight, KV per stage.
    Exit 0 when the gateway serves, 1 when it answers but serves nothing (no live pipeline,
    draining), 2 when it cannot be reached."""
    tls = Tls(ca=args.tls_ca) if args.tls_ca else None
    try:
        st = status(args.target, tls, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"hexplan: error: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["serving"] else 1
    state = "serving" if st["serving"] else ("draining" if st["draining"] else "NOT serving")
    print(f"gateway {args.target}: {st['model']}, {state}; {st['in_flight']} request(s) in flight, "
          f"{st['queued']} queued" + (f"; nodes down: {', '.join(st['down_nodes'])}" if st["down_nodes"] else ""))
    print(f"{'pipeline':>8}  {'state':<8} {'in flight':>9}  stages (node address: sequences, KV MiB)")
    for p in st["pipelines"]:
        stages = "  ".join(
            f"{s['node']} {s['address']}: " + (f"{s['sequences']}, {int(s['kv_bytes']) / 2**20:.1f}"
                                                if s["answering"] else "-")
            for s in p["stages"])
        print(f"{p['index']:>8}  {p['state']:<8} {p['in_flight']:>9}  {stages}"
              + (f"  ({p['reason']})" if p["reason"] else ""))
    return 0 if st["serving"] else 1


def prefill(target: str, *, prompt: str = "", token_ids=None, hidden: bool = False, tls: Tls | None = None,
            timeout: float | None = 600) -> dict:
    """Prefill only (scoring, classification, embeddings): no generation. Returns {"logits":
    float32 tensor [vocab] after the prompt's last token, "hidden": its final hidden state
    [hidden_size] (after the final norm) or None, "prompt_tokens"}."""
    from .wire import from_proto
    req = pb.PrefillRequest(prompt=prompt, token_ids=list(token_ids or []), hidden=hidden)
    with channel(target, tls) as ch:
        out = pbg.InferenceStub(ch).Prefill(req, timeout=timeout)
    return {"logits": from_proto(out.logits), "hidden": from_proto(out.hidden) if out.HasField("hidden") else None,
            "prompt_tokens": out.prompt_tokens}


def run_prefill(args, tls: Tls | None, ids) -> int:
    try:
        out = prefill(args.target, prompt=args.prompt or "", token_ids=ids, hidden=args.hidden, tls=tls,
                      timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"hexplan: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt_tokens": out["prompt_tokens"], "logits": out["logits"].tolist(),
                          "hidden": out["hidden"].tolist() if out["hidden"] is not None else None}))
        return 0
    probs = out["logits"].softmax(-1)
    top = probs.topk(min(5, probs.numel()))
    print(f"{out['prompt_tokens']} prompt tokens; most likely next tokens:")
    for p, t in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {t:>8}  {p:.4f}")
    if out["hidden"] is not None:
        h = out["hidden"]
        print(f"hidden state: {h.numel()} values, L2 norm {float(h.norm()):.4f}")
    return 0


def run_generate(args) -> int:
    tls = Tls(ca=args.tls_ca) if args.tls_ca else None
    ids = [int(x) for x in args.token_ids.split(",") if x.strip()] if args.token_ids else None
    wait_s = getattr(args, "wait", 0) or 0
    if wait_s > 0:
        def waiting(problem):
            print(f"hexplan: waiting up to {wait_s:g} s for the gateway at {args.target} to serve "
                  f"({problem.split(':')[0]} for now)", file=sys.stderr, flush=True)
        try:
            wait_until_serving(args.target, wait_s, tls, on_waiting=waiting)
        except WaitError as e:
            print(f"hexplan: error: --wait {wait_s:g}: {e}", file=sys.stderr)
            return 2
    if getattr(args, "prefill_only", False):
        return run_prefill(args, tls, ids)
    stream = None
    if not args.json:
        stream = lambda toks, text: (sys.stdout.write(text if text else " ".join(map(str, toks)) + " "),
                                     sys.stdout.flush())
    try:
        out = generate(args.target, prompt=args.prompt or "", token_ids=ids, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       tls=tls, timeout=args.timeout, on_tokens=stream)
    except grpc.RpcError as e:
        print(f"hexplan: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(f"\n[{out['finish_reason']}, {len(out['token_ids'])} tokens]")
    return 0
