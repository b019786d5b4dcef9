"""``hexplan simulate``: the command behind the CLI (it reads files, prints and writes the plot).

hexplan/cli.py declares the flags and hands the parsed arguments here, as it does for
``hexplan generate``; the simulation itself (run.py) does no IO.
"""
from __future__ import annotations

import json
import sys

from .. import simulator as sim
from ..cluster import load_cluster
from ..errors import SpecError
from ..plan import load_plan
from . import plot as plotting
from . import report

_SIM_FLAGS = {"rate": "--rate", "duration": "--duration", "cv": "--cv", "warmup": "--warmup", "arrival": "--arrival",
              "prompt_len": "--prompt-len", "output_len": "--output-len", "workload": "--workload",
              "sweep_rate": "--sweep-rate", "prefill_budget": "--prefill-budget", "loops": "--loops",
              "prefill_chunk": "--prefill-chunk", "policy": "--policy", "interleave": "--interleave"}


def _workload(args, trace) -> "sim.WorkloadSpec":
    """A trace alone is replayed; with a rate (or a sweep) it only supplies the lengths."""
    replay = args.rate is None and not args.sweep_rate

    def length(text, field):
        text = text or ("trace" if trace and not replay else None)
        return sim.LengthDist.parse(text, field) if text else None

    return sim.WorkloadSpec(
        arrival="trace" if replay else (args.arrival or "poisson"),
        rate=None if replay else (args.rate or 1.0),     # a sweep sets its own rates
        cv=args.cv,
        duration=args.duration if args.duration is not None or replay else 600.0,
        prompt_len=length(args.prompt_len, "prompt_len"), output_len=length(args.output_len, "output_len"),
        trace=trace, trace_name=args.workload or "", warmup=args.warmup)


def run_simulate(args) -> int:
    """``hexplan simulate``: read the files, run, print the table or JSON, write the plot."""
    plot = plotting if args.plot else None
    if plot:
        plot.require()   # fail before a long run, not after it
    cluster = load_cluster(args.cluster)
    plan = load_plan(args.plan)
    try:
        trace = sim.load_trace(args.workload) if args.workload else ()
        if args.rate is None and not args.workload and not args.sweep_rate:
            raise SpecError("give a request rate (with --duration) or a trace file (--workload)", field="rate")
        if args.rate is None and args.arrival and not args.sweep_rate:
            raise SpecError(f"--arrival {args.arrival} needs a request rate", field="rate")
        for flag in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_s"):
            v = getattr(args, flag)
            if v is not None and not (0 < v < float("inf")):
                raise SpecError(f"must be a positive number, got {v:g}", field="--" + flag.replace("_", "-"))
        spec = _workload(args, trace)
        ms = lambda v: v / 1e3 if v is not None else None
        slo = sim.Slo(ttft_s=ms(args.slo_ttft_ms), tpot_s=ms(args.slo_tpot_ms), e2e_s=args.slo_e2e_s)
        opts = dict(prefill_budget=args.prefill_budget, loops=args.loops, prefill_chunk=args.prefill_chunk,
                    routing=args.routing, policy=args.policy, interleave=args.interleave)
        if args.sweep_rate:
            if not slo:
                raise SpecError("a rate sweep needs an objective: give --slo-ttft-ms, --slo-tpot-ms or --slo-e2e-s",
                                field="sweep_rate")
            probe_out = sys.stderr if args.json else sys.stdout
            sweep = sim.sweep_rate(plan, cluster, spec, slo, args.seed, percentile=args.slo_percentile,
                                   start_rate=args.rate, **opts,
                                   on_probe=lambda p: print(report.format_probe(p, args.slo_percentile),
                                                            file=probe_out, flush=True))
        else:
            result = sim.simulate(plan, cluster, spec, args.seed, slo=slo or None, **opts)
    except SpecError as e:   # name the command-line flag, or the plan file
        if not e.file and e.field in _SIM_FLAGS:
            raise SpecError(e.message, field=_SIM_FLAGS[e.field]) from None
        if not e.file and (e.field or "").split(".")[0] in ("plan", "assumptions"):
            raise e.located(args.plan) from None
        raise
    title = f"simulated {plan.model.name} on {cluster.name}: {len(plan.pipelines)} pipeline(s), {plan.num_gpus} GPUs"
    interleave = args.interleave or (plan.assumptions.get("workload") or {}).get("interleave", 1)
    if interleave != 1:
        title += f", steps in {interleave} interleaved parts"
    if args.sweep_rate:
        if args.json:
            print(json.dumps(sweep.to_dict(), indent=2))
        else:
            print(report.format_sweep(sweep, slo))
        if plot:
            plot.sweep(sweep, args.plot)
    else:
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            print(report.format_result(result, title))
        if plot:
            plot.latency_cdfs(result, args.plot)
    if plot and not args.json:
        print(f"plot written to {args.plot}")
    return 0
