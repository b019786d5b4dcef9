"""The cost model's prediction for Shift Parallelism: Llama-3-70B on one node of 8 H100-80G.

    python bench/shift_predict.py [--alpha-us 10,1] [--prompt 2048] [--output 256] [--batch 64]
                                  [--duration 120] [--json]

Nothing here is measured: every number is hexplan's cost model (docs/cost-model.md, section 14)
and its simulator, for three ways to run the node's 8 GPUs as one stage holding all 80 layers:

* TP-8: one tensor-parallel group of 8 (today's plans);
* SP only: every step in SP mode, sp x tp = 8 with one weight copy per GPU (W / tp); the largest
  sp whose weights and KV cache fit (sp 8 x tp 1 would need 141 GB per GPU in bf16);
* shift: ``shift: {sp: S}`` on the TP-8 stage, each step in the mode of the threshold rule (the
  cost model's crossover); SP mode's weight shards per GPU, W / (8 / S) (TP mode reads views of
  them: one copy, where Arctic keeps W / 8 beside it), so the largest S that fits.

Interactive: 1, 2 and 4 requests in flight (decode batch = requests), no queueing: TTFT (one
prompt alone), TPOT (a decode step of the batch) and a response's end-to-end time, TTFT +
(output - 1) x TPOT (hexplan.evaluate.evaluate_pipeline). Batch: ``--batch`` sequences in
flight, Poisson arrivals at three times the TP-8 plan's predicted capacity for ``--duration``
seconds (saturated), throughput in output tokens/s from the simulator (hexplan.simulator
engine, where every step of a shifted stage takes its mode by the rule) beside the analytic
prediction. Each table is printed for each all-reduce step latency in ``--alpha-us``: 10 us
is the cost model's default (CostParams.allreduce_alpha), 1 us an NVLink-class figure (NCCL's
small all-reduces on 8 H100 take some 10-30 us, 14 ring steps; not measured here).
Arctic Inference publishes up to 1.51x faster responses (interactive) and 50% more
throughput (batch) than TP only; the ratio columns compare with those.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for sub in ("", "solver"):
    p = str(ROOT / sub) if sub else str(ROOT)
    if p not in sys.path:
        sys.path.insert(0, p)

from hexplan.cluster import cluster_to_dict, loads_cluster  # noqa: E402
from hexplan.costmodel import CostParams, Workload, local_kv_heads, shift_threshold, stage_cost  # noqa: E402
from hexplan.dispatch import Dispatcher  # noqa: E402
from hexplan.evaluate import CostCache, evaluate_pipeline  # noqa: E402
from hexplan.models import BUILTIN_MODELS  # noqa: E402
from hexplan.plan import Pipeline, Plan, Stage  # noqa: E402
from hexplan.simulator.engine import Engine, EngineOptions  # noqa: E402
from hexplan.simulator.metrics import Slo, summarise  # noqa: E402
from hexplan.simulator.workload import RequestStream, WorkloadSpec  # noqa: E402

MODEL = BUILTIN_MODELS["llama-3-70b"]
CLUSTER = loads_cluster("name: h100x8\nnodes:\n  - {name: n0, gpu: H100-80G, count: 8}\n")
D = 8
SPS = (8, 4, 2)


def memory_gb(w: Workload, p: CostParams, sp: int, copies: str) -> tuple[float, float]:
    """(GB used, GB usable) per GPU of the 8-GPU stage: 'tp' (TP-8), 'shift' (SP mode's shards) or
    'sp' (SP only: one copy at tp = 8 / sp; KV as in TP-8: attention is head-parallel over 8)."""
    node = CLUSTER.nodes[0]
    if copies == "sp":
        t = D // sp
        sc = stage_cost(MODEL, node.gpu, D, w, node.interconnect, p)
        kv = w.concurrency * w.context * 2 * local_kv_heads(MODEL, D) * MODEL.dim_head * MODEL.bytes_per_param
        used = MODEL.num_layers * (MODEL.layer_bytes / t + kv) + (MODEL.embedding_bytes + MODEL.head_bytes) / t
        return used / 1e9, sc.usable_memory / 1e9
    sc = stage_cost(MODEL, node.gpu, D, w, node.interconnect, p, sp if copies == "shift" else 1)
    return sc.memory_used(MODEL.num_layers, True, True) / 1e9, sc.usable_memory / 1e9


def pick_sp(w: Workload, p: CostParams, copies: str) -> int | None:
    for sp in SPS:
        used, usable = memory_gb(w, p, sp, copies)
        if used <= usable:
            return sp
    return None


def plan_for(w: Workload, p: CostParams, sp: int) -> Plan:
    stage = Stage("n0", tuple(range(D)), D, (0, MODEL.num_layers), "H100-80G", sp)
    return Plan(MODEL, (Pipeline((stage,), 1.0),), {}, {},
                {"objective": "throughput", "workload": w.to_dict(), "cost_params": p.to_dict()},
                cluster_to_dict(CLUSTER, None, MODEL.name))


def configs(w: Workload, p: CostParams):
    """(name, stage sp, cost params, memory (used, usable) GB) of TP-8, SP only and shift."""
    out = [("TP-8", 1, p, memory_gb(w, p, 1, "tp"))]
    s = pick_sp(w, p, "sp")
    if s:   # every step in SP mode: threshold 0
        out.append((f"SP only (sp {s} x tp {D // s})", s, replace(p, shift_threshold=0), memory_gb(w, p, s, "sp")))
    s = pick_sp(w, p, "shift")
    if s:
        thr = shift_threshold(MODEL, CLUSTER.nodes[0].gpu, D, s, CLUSTER.nodes[0].interconnect, p)
        out.append((f"shift (sp {s} x tp {D // s}, threshold {thr})", s, p, memory_gb(w, p, s, "shift")))
    return out


def interactive(p: CostParams, prompt: int, output: int) -> list[dict]:
    rows = []
    for c in (1, 2, 4):
        w = Workload(prompt, output, c, c)
        base = None
        for name, sp, params, (used, usable) in configs(w, p):
            m = evaluate_pipeline(CLUSTER, CostCache(MODEL, w, params), ["n0"], [D], [MODEL.num_layers],
                                  shifts=[sp])
            e2e = m.ttft_s + (output - 1) * m.tpot_s
            row = {"requests": c, "config": name, "ttft_ms": m.ttft_s * 1e3, "tpot_ms": m.tpot_s * 1e3,
                   "e2e_s": e2e, "memory_gb": used, "usable_gb": usable}
            base = base or row
            row["ttft_x"] = base["ttft_ms"] / row["ttft_ms"]
            row["e2e_x"] = base["e2e_s"] / row["e2e_s"]
            rows.append(row)
    return rows


def batch(p: CostParams, prompt: int, output: int, n: int, duration: float) -> list[dict]:
    w = Workload(prompt, output, n, n)
    rows, rate, base = [], None, None
    for name, sp, params, (used, usable) in configs(w, p):
        plan = plan_for(w, params, sp)
        m = evaluate_pipeline(CLUSTER, CostCache(MODEL, w, params), ["n0"], [D], [MODEL.num_layers], shifts=[sp])
        rate = rate or 3 * m.throughput / output       # saturate: 3x the TP-8 plan's capacity
        spec = WorkloadSpec(arrival="poisson", rate=rate, duration=duration)
        eng = Engine(plan, CLUSTER, w, params, EngineOptions(), Dispatcher([1.0]))
        st = eng.run(RequestStream(spec, prompt, output, MODEL.max_position_embeddings, 0),
                     (spec.warmup_s, spec.horizon), 0)
        res = summarise(st, slo=Slo(), weights=[1.0], predicted=m.throughput, workload={}, seed=0,
                        keep_samples=False)
        row = {"config": name, "predicted_tokens_per_s": m.throughput,
               "simulated_tokens_per_s": res.throughput_tokens_per_s,
               "sp_steps": st.shift_steps.get("sp", 0), "tp_steps": st.shift_steps.get("tp", 0),
               "memory_gb": used, "usable_gb": usable}
        base = base or row
        row["simulated_x"] = row["simulated_tokens_per_s"] / base["simulated_tokens_per_s"]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha-us", default="10,1", help="all-reduce step latencies to tabulate, us (default 10,1)")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--output", type=int, default=256, help="output tokens (default 256)")
    ap.add_argument("--batch", type=int, default=64, help="sequences in flight in the batch case (default 64)")
    ap.add_argument("--duration", type=float, default=120.0, help="simulated seconds of the batch case (default 120)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args(argv)
    try:
        alphas = [float(x) for x in a.alpha_us.split(",") if x.strip()]
    except ValueError:
        print(f"hexplan: --alpha-us: expected comma-separated numbers, got {a.alpha_us!r}", file=sys.stderr)
        return 2
    if not alphas or any(not (x > 0 and math.isfinite(x)) for x in alphas) or min(a.prompt, a.output, a.batch) < 1 \
            or not a.duration > 0:
        print("hexplan: --alpha-us, --prompt, --output, --batch and --duration must be positive", file=sys.stderr)
        return 2
    out = []
    for alpha in alphas:
        p = CostParams(allreduce_alpha=alpha * 1e-6)
        inter = interactive(p, a.prompt, a.output)
        bat = batch(p, a.prompt, a.output, a.batch, a.duration)
        out.append({"alpha_us": alpha, "interactive": inter, "batch": bat})
        if a.json:
            continue
        print(f"\nllama-3-70b (bf16) on 8 x H100-80G, all-reduce step latency {alpha:g} us; "
              f"prompt {a.prompt}, output {a.output} tokens")
        print(f"interactive (no queueing)  {'config':42s} {'TTFT ms':>8s} {'TPOT ms':>8s} {'E2E s':>7s} "
              f"{'TTFT x':>7s} {'E2E x':>6s} {'GB/GPU':>7s}")
        for r in inter:
            print(f"  {r['requests']} request(s) in flight    {r['config']:42s} {r['ttft_ms']:8.1f} {r['tpot_ms']:8.2f} "
                  f"{r['e2e_s']:7.2f} {r['ttft_x']:7.2f} {r['e2e_x']:6.2f} {r['memory_gb']:7.1f}")
        print(f"batch ({a.batch} in flight, saturated)  {'config':35s} {'predicted':>10s} {'simulated':>10s} "
              f"{'x TP-8':>7s} {'SP/TP steps':>12s} {'GB/GPU':>7s}")
        for r in bat:
            print(f"  {'':33s}{r['config']:37s} {r['predicted_tokens_per_s']:10.0f} {r['simulated_tokens_per_s']:10.0f} "
                  f"{r['simulated_x']:7.2f} {r['sp_steps']:>5d}/{r['tp_steps']:<6d} {r['memory_gb']:7.1f}")
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print("\nArctic Inference (published): up to 1.51x faster responses interactive, 1.50x throughput batch, vs TP only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
