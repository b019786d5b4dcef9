"""``hexplan simulate``: the command behind the CLI (it reads files, prints and writes the plot).

hexplan/cli.py declares the flags and hands the parsed arguments here, as it does for
``hexplan generate``; the simulation itself (run.py) does no IO.

The plan alone is enough: without ``--cluster`` the cluster is rebuilt from the plan's
``cluster`` section, and without ``--rate`` or ``--workload`` the traffic is Poisson at
DEFAULT_LOAD of the plan's predicted capacity, with the plan's lengths (said on stderr).
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from .. import simulator as sim
from ..cluster import Cluster, load_cluster
from ..errors import SpecError
from ..plan import Plan, load_plan, plan_cluster
from ..validate import plan_assumptions
from . import plot as plotting
from . import report
from .run import DEFAULT_LOAD, capacity_rate

_SIM_FLAGS = {"rate": "--rate", "duration": "--duration", "cv": "--cv", "warmup": "--warmup", "arrival": "--arrival",
              "prompt_len": "--prompt-len", "output_len": "--output-len", "workload": "--workload",
              "sweep_rate": "--sweep-rate", "prefill_budget": "--prefill-budget", "loops": "--loops",
              "prefill_chunk": "--prefill-chunk", "policy": "--policy", "interleave": "--interleave",
              "shift_threshold": "--shift-threshold"}


def _workload(args, trace) -> "sim.WorkloadSpec":
    """A trace alone is replayed; with a rate (or a sweep) it only supplies the lengths."""
    replay = args.rate is None and not args.sweep_rate and bool(args.workload)

    def length(text, field):
        text = text or ("trace" if trace and not replay else None)
        return sim.LengthDist.parse(text, field) if text else None

    return sim.WorkloadSpec(
        arrival="trace" if replay else (args.arrival or "poisson"),
        rate=None if replay else (args.rate or 1.0),     # a sweep, or _default_rate, sets its own
        cv=args.cv,
        duration=args.duration if args.duration is not None or replay else 600.0,
        prompt_len=length(args.prompt_len, "prompt_len"), output_len=length(args.output_len, "output_len"),
        trace=trace, trace_name=args.workload or "", warmup=args.warmup)


def _cluster(args, plan: Plan) -> Cluster:
    """The --cluster file, else the cluster of the plan's nodes rebuilt from the plan."""
    if args.cluster:
        return load_cluster(args.cluster)
    try:
        return plan_cluster(plan)
    except SpecError as e:
        raise SpecError(f"{e.message}; give the cluster file with --cluster", file=args.plan, field=e.field) from None


def _default_rate(args, plan: Plan, cluster: Cluster, spec: "sim.WorkloadSpec") -> "sim.WorkloadSpec":
    """No --rate and no --workload: DEFAULT_LOAD of the plan's predicted capacity (its predicted
    output tokens/s over the mean output length), rounded to 3 digits so the note's rate can be
    given back as --rate. The choice goes to stderr: stdout stays the report (or pure JSON)."""
    capacity = capacity_rate(plan, cluster, spec, args.interleave, args.shift_threshold)
    if not capacity > 0:
        raise SpecError("the plan predicts no throughput to take a default rate from: give one", field="rate")
    rate = float(f"{DEFAULT_LOAD * capacity:.3g}")
    spec = replace(spec, rate=rate)
    wl = plan_assumptions(plan).workload
    if args.prompt_len is None and args.output_len is None:
        lengths = f"prompt/output lengths from the plan's workload ({wl.prompt_tokens}/{wl.output_tokens})"
    else:
        d = spec.describe(wl.prompt_tokens, wl.output_tokens)
        lengths = f"prompt {d['prompt_tokens']} and output {d['output_tokens']} tokens"
    arrivals = "Poisson arrivals" if spec.arrival == "poisson" else f"gamma arrivals (cv {spec.cv:g})"
    print(f"hexplan: no --rate or --workload: simulating {arrivals} at "
          f"{DEFAULT_LOAD:.0%} of the plan's predicted capacity ({rate:g} of {capacity:.3g} requests/s) "
          f"for {spec.duration:g} s, {lengths}", file=sys.stderr, flush=True)
    return spec


def run_simulate(args) -> int:
    """``hexplan simulate``: read the files, run, print the table or JSON, write the plot."""
    plot = plotting if args.plot else None
    if plot:
        plot.require()   # fail before a long run, not after it
    plan = load_plan(args.plan)
    cluster = _cluster(args, plan)
    try:
        trace = sim.load_trace(args.workload) if args.workload else ()
        default_rate = args.rate is None and not args.workload and not args.sweep_rate
        if args.rate is None and args.workload and args.arrival and not args.sweep_rate:
            raise SpecError(f"--arrival {args.arrival} needs a request rate (a trace alone is replayed at its own "
                            "arrival times)", field="rate")
        for flag in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_s"):
            v = getattr(args, flag)
            if v is not None and not (0 < v < float("inf")):
                raise SpecError(f"must be a positive number, got {v:g}", field="--" + flag.replace("_", "-"))
        spec = _workload(args, trace)
        if default_rate:
            spec = _default_rate(args, plan, cluster, spec)
        ms = lambda v: v / 1e3 if v is not None else None
        slo = sim.Slo(ttft_s=ms(args.slo_ttft_ms), tpot_s=ms(args.slo_tpot_ms), e2e_s=args.slo_e2e_s)
        opts = dict(prefill_budget=args.prefill_budget, loops=args.loops, prefill_chunk=args.prefill_chunk,
                    routing=args.routing, policy=args.policy, interleave=args.interleave,
                    shift_threshold=args.shift_threshold)
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
