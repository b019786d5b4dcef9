"""The ``hexplan`` command line. It owns all IO and exit codes.

Exit codes: 0 success, 2 bad input or an infeasible request (one line on stderr, no traceback),
130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

from . import __version__
from .cluster import load_cluster, loads_cluster
from .costmodel import Workload
from .errors import HexplanError, InfeasibleError, SpecError
from .gpus import CATALOG
from .logconfig import FORMATS as LOG_FORMATS, LEVELS as LOG_LEVELS, configure as configure_logging
from .models import BUILTIN_MODELS, load_model
from .plan import load_plan
from .render import format_plan, gpu_summary as _gpu_summary, table as _table
from .validate import describe_problems, shared_host_notes, validate_plan


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def traffic_args(parser) -> None:
    """The traffic flags `simulate` and `compare` share (see hexplan.simulator.WorkloadSpec)."""
    parser.add_argument("--workload", help="trace file: JSON lines {arrival_s, prompt_tokens, output_tokens}; "
                                           "replayed, or with --rate the source of the lengths")
    parser.add_argument("--rate", type=float, help="requests/s (Poisson or gamma arrivals)")
    parser.add_argument("--duration", type=float, help="seconds of traffic (default 600 with --rate; a trace: its last arrival)")
    parser.add_argument("--prompt-len", help="prompt tokens: N, A-B (uniform) or trace (default: the plan's workload)")
    parser.add_argument("--output-len", help="output tokens: N, A-B (uniform) or trace (default: the plan's workload)")
    parser.add_argument("--arrival", choices=("poisson", "gamma"), help="arrival process with --rate (default poisson)")
    parser.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation of the gaps (default 2)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hexplan", description="Place and serve LLMs on heterogeneous GPU clusters.")
    p.add_argument("--version", action="version", version=f"hexplan {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("solve", help="plan a model on a cluster (asymmetric TP/PP + routing)",
                       description="Find pipelines of tensor-parallel stages and routing weights that "
                                   "maximise throughput (or minimise latency) for a model on a cluster.")
    s.add_argument("cluster", help="cluster YAML file")
    s.add_argument("--model", "-m", required=True, help="built-in model name (see `hexplan models`) or a HF config.json")
    s.add_argument("-o", "--output", help="plan file to write (default: <cluster>-<model>.plan.yaml; '-' for stdout)")
    s.add_argument("--format", choices=("yaml", "json"), default="yaml", help="plan file format (default yaml)")
    s.add_argument("--objective", choices=("throughput", "latency"), default="throughput",
                   help="maximise tokens/s (default) or minimise time per output token")
    s.add_argument("--slo-tpot-ms", type=float, help="max time per output token of every pipeline (ms)")
    s.add_argument("--slo-ttft-ms", type=float, help="max time to first token of every pipeline (ms)")
    s.add_argument("--time-limit", type=float, default=60.0, help="seconds for the search (default 60)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same plan")
    s.add_argument("--solver", choices=("highs", "cbc", "ortools", "none"), default="highs",
                   help="MILP backend: highs (default), cbc, ortools (SCIP through OR-Tools; the column "
                        "generation then uses GLOP and CP-SAT), or none (heuristic only)")
    s.add_argument("--lp-backend", choices=("highs", "glop", "pdlp"),
                   help="column generation's master LP: highs, glop or pdlp (OR-Tools) (default: glop with "
                        "--solver ortools, else highs)")
    s.add_argument("--int-backend", choices=("cpsat", "highs"),
                   help="integer choice of pipeline patterns: cpsat (OR-Tools) or highs (default: cpsat when "
                        "OR-Tools is installed, else highs)")
    s.add_argument("--max-pipelines", type=int, help="at most this many pipelines (replicas)")
    s.add_argument("--shift", action=argparse.BooleanOptionalAction, default=False,
                   help="let stages of TP >= 2 run shifted (Shift Parallelism: TP mode for small steps, SP mode "
                        "for large ones; SP mode's weight shards per GPU, sp x those of TP mode) where that improves the objective by 2%% and "
                        "fits in memory (default: --no-shift)")
    w = s.add_argument_group("workload (what the plan is optimised for)")
    d = Workload()
    w.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help=f"average prompt length (default {d.prompt_tokens})")
    w.add_argument("--output-tokens", type=int, default=d.output_tokens, help=f"average output length (default {d.output_tokens})")
    w.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per decode step of a stage (default {d.batch_size})")
    w.add_argument("--concurrency", type=int, default=d.concurrency,
                   help=f"sequences in flight per pipeline; KV cache is reserved for them (default {d.concurrency})")
    w.add_argument("--interleave", type=int, default=d.interleave, metavar="N",
                   help="plan for steps cut into N parts that overlap compute with communication (Liger-style, as "
                        "`hexplan serve --interleave N`; each part re-reads the weights); recorded in the plan "
                        f"(default {d.interleave}: off)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    cp = sub.add_parser("compare", help="every planner (hexplan and the baselines) on one cluster, predicted and simulated",
                        description="Plan with hexplan and every baseline, replay the same traffic against each plan, "
                                    "and print one table. Without --rate or --workload the traffic is offline (twice "
                                    "the best predicted request rate for 300 s), so throughput is each plan's capacity.")
    cp.add_argument("cluster", help="cluster YAML file")
    cp.add_argument("--model", "-m", required=True, help="built-in model name or a HF config.json")
    traffic_args(cp)
    cp.add_argument("--planners", help="comma-separated subset (default: all)")
    cp.add_argument("--budget-per-hour", type=float, help="also plan homogeneous clusters of this list price ($/hour)")
    cp.add_argument("--time-limit", type=float, default=30.0, help="seconds per planner (default 30)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--json", action="store_true", help="print a list of objects instead of the table")
    for flag, default in (("--prompt-tokens", d.prompt_tokens), ("--output-tokens", d.output_tokens),
                          ("--batch-size", d.batch_size), ("--concurrency", d.concurrency)):
        cp.add_argument(flag, type=int, default=default, help=f"planning workload (default {default})")

    v = sub.add_parser("validate", help="check a cluster spec (and optionally a plan against it)")
    v.add_argument("cluster", help="cluster YAML file")
    v.add_argument("--plan", help="also check this plan file against the cluster")

    sh = sub.add_parser("show", help="print a plan file as a table")
    sh.add_argument("plan", help="plan file (YAML or JSON)")
    sh.add_argument("--cluster", help="re-check the plan against this cluster")

    sm = sub.add_parser("simulate", help="replay traffic against a plan in a discrete-event simulator",
                        description="Simulate a plan under traffic: Poisson/gamma arrivals or a trace, continuous "
                                    "batching, KV admission, FIFO stages and links. The plan alone is enough: its "
                                    "cluster section records the nodes it uses and their network, and without "
                                    "--rate or --workload the traffic is Poisson at 80% of the plan's predicted "
                                    "request rate, for 600 s, with the plan's lengths (said on stderr). "
                                    "See docs/simulator.md.")
    sm.add_argument("plan", help="plan file (YAML or JSON)")
    sm.add_argument("--cluster", help="cluster YAML to run (and check) the plan on (default: the nodes the plan "
                                      "records; needed for plans from before they recorded their network)")
    traffic_args(sm)
    sm.add_argument("--warmup", type=float, help="seconds left out of the measurement (default 10%% of the duration)")
    sm.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same result")
    sm.add_argument("--slo-ttft-ms", type=float, help="time to first token objective (ms)")
    sm.add_argument("--slo-tpot-ms", type=float, help="time per output token objective (ms)")
    sm.add_argument("--slo-e2e-s", type=float, help="end-to-end latency objective (s)")
    sm.add_argument("--sweep-rate", action="store_true",
                    help="binary-search the highest request rate whose run meets the SLO at --slo-percentile")
    sm.add_argument("--slo-percentile", type=int, choices=(50, 90, 99), default=90, help="percentile the SLO applies to in a sweep (default 90)")
    sm.add_argument("--prefill-budget", type=int,
                    help="prompt tokens of a step whose loop has nothing decoding (default: the plan's prompt length; "
                         "the first prompt always goes whole), as the gateway")
    sm.add_argument("--prefill-chunk", type=int,
                    help="prompt tokens of a step whose loop has sequences decoding (chunked prefill; default "
                         "batch x prompt / output tokens of the plan's workload), as the gateway")
    sm.add_argument("--routing", choices=("delay", "weights"), default="delay",
                    help="delay: shortest expected delay, as the gateway (default); weights: random by the plan's weights")
    sm.add_argument("--loops", type=int, help="micro-batch loops per pipeline (default: ceil(concurrency / batch), as the gateway)")
    sm.add_argument("--policy", default="fcfs", metavar="{fcfs,mlfq}",
                    help="scheduling: fcfs (default: first come first served, a request keeps its batch slot to the end, "
                         "as the gateway) or mlfq (FastServe's skip-join multi-level feedback queue: preemption per "
                         "output token, KV offload to host memory under pressure)")
    sm.add_argument("--shift-threshold", type=int, metavar="TOKENS",
                    help="shifted stages run a step in SP mode above this many tokens, as the executor's "
                         "--shift-threshold (default: the plan's, else each stage's cost-model crossover)")
    sm.add_argument("--interleave", type=int, metavar="N",
                    help="steps cut into N parts that overlap compute with communication, as the executor's "
                         "--interleave (default: the plan's, else 1: off)")
    sm.add_argument("--json", action="store_true", help="print the results as JSON")
    sm.add_argument("--plot", help="write a PNG: latency CDFs, or throughput/latency against rate for a sweep")

    def tls_args(parser, server=True):
        if server:
            parser.add_argument("--tls-cert", help="PEM certificate: serve with TLS")
            parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
        parser.add_argument("--tls-ca", help="PEM CA certificate to verify the peers' TLS certificates")

    def log_args(parser):
        parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                            help="log records at this level and above go to stderr (default info; "
                                 "debug, info, warning, error)")
        parser.add_argument("--log-format", type=str.lower, choices=LOG_FORMATS, default="text",
                            help="stderr log lines: text (timestamp level logger: message) or json (one object "
                                 "per line: ts, level, logger, message and the record's fields; default text)")

    nd = sub.add_parser("node", help="run the executor of one machine (stage workers of a plan)")
    nd.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT to listen on (default 127.0.0.1:50061; port 0 = any)")
    nd.add_argument("--name", required=True, help="this node's name in the cluster spec and plan")
    nd.add_argument("--threads", type=int, help="CPU threads per worker process (default: torch's choice)")
    # set by `hexplan launch`: stop when the launcher is gone (SIGKILL included); not for users
    nd.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    nd.add_argument("--parent-death-signal", action="store_true", help=argparse.SUPPRESS)
    tls_args(nd)
    nd.add_argument("--auth-token-file", metavar="FILE",
                    help="a file holding the shared token every caller (gateway, other stages) must send "
                         "(authorization: Bearer TOKEN); without it and without --tls-ca the node listens on "
                         "loopback only. `hexplan launch` hands its nodes a fresh token in HEXPLAN_AUTH_TOKEN")
    nd.add_argument("--checkpoint-root", action="append", default=[], metavar="DIR",
                    help="LoadShard reads only checkpoints under DIR (symlinks resolved; repeatable; default: none, "
                         "so every LoadShard is refused)")
    log_args(nd)

    def policy_args(parser):
        parser.add_argument("--policy", default="fcfs",
                            help="scheduling: fcfs (default: a request keeps its micro-batch slot until it ends) or mlfq "
                                 "(FastServe's skip-join multi-level feedback queue: preempts long requests, offloads "
                                 "their KV to host memory when the plan's concurrency is reached)")
        parser.add_argument("--mlfq-quantum-ms", type=float,
                            help="mlfq: the top queue's quantum (default: the plan's time per output token, else 50 ms)")
        parser.add_argument("--interleave", type=int, metavar="N",
                            help="split each step into N parts and overlap one part's communication with the next "
                                 "part's compute: the first stage sends part i on while computing part i+1, a TP "
                                 "stage's all-reduces run asynchronously under it (Liger-style; default: the plan's "
                                 "from `hexplan solve --interleave`, else 1: off)")
        parser.add_argument("--shift-threshold", type=int, metavar="TOKENS",
                            help="stages the plan shifts (shift: {sp: S}, Shift Parallelism) run a step of more than "
                                 "TOKENS tokens in SP mode (S groups of tp/S ranks, Ulysses all-to-alls) and smaller "
                                 "ones in TP mode; 0: every step in SP mode (default: each stage's cost-model "
                                 "crossover, hexplan.costmodel.shift_threshold; 256 for a plan without a cluster "
                                 "section)")
        parser.add_argument("--matmul-pieces", type=int, default=1, metavar="K",
                            help="cut each TP row-parallel matrix product into K slices whose all-reduces overlap "
                                 "the rest of the product (default 1: off)")

    def http_args(parser):
        parser.add_argument("--http", metavar="HOST:PORT",
                            help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                                 "/v1/models, /health, /metrics) on HOST:PORT, e.g. 127.0.0.1:8000 (port 0 = any); "
                                 "needs the [http] extra. Its clients are not authenticated")
        parser.add_argument("--served-model-name", metavar="NAME",
                            help="the model's name in the HTTP API (default: the checkpoint folder's name)")
        parser.add_argument("--chat-template", metavar="FILE",
                            help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")
        parser.add_argument("--max-queue", type=int, metavar="N",
                            help="HTTP requests beyond the plan's total concurrency that may wait for a slot; one more "
                                 "gets 429 (default: 4 x the concurrency, at least 64, at most 1024: the gRPC "
                                 "server's allowance)")

    sv = sub.add_parser("serve", help="run the gateway: load a plan on its node executors and serve requests")
    sv.add_argument("--plan", required=True, help="plan file from `hexplan solve` (or hand-written)")
    sv.add_argument("--checkpoint", required=True, help="Hugging Face safetensors checkpoint directory (same path on every node)")
    sv.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT for clients (default 127.0.0.1:50051)")
    sv.add_argument("--nodes", default="", help="node addresses NAME=HOST:PORT,... (default: the plan's cluster section)")
    sv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    sv.add_argument("--max-batch", type=int, help="sequences per micro-batch (default: the plan's batch_size)")

    def drain_arg(parser):
        parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                            help="on SIGTERM/SIGINT, stop admitting (new requests get UNAVAILABLE, health turns "
                                 "NOT_SERVING) and let the requests in flight finish for up to SECONDS before "
                                 "stopping (default 30; 0: cut them at once; a second signal cuts the wait short)")
        parser.add_argument("--stall-timeout", type=float, default=10.0, metavar="SECONDS",
                            help="a step that takes longer than 10 x its expected time, and at least SECONDS, makes "
                                 "its pipeline suspect: its requests move to a live pipeline and the pipeline is "
                                 "reloaded (default 10)")
        parser.add_argument("--recovery-wait", type=float, default=30.0, metavar="SECONDS",
                            help="requests already accepted wait up to SECONDS for a pipeline to come back when none "
                                 "is live, then fail UNAVAILABLE (default 30; 0: fail them at once)")
    def replan_args(parser, how):
        g = parser.add_argument_group("re-plan on cluster change (docs/deploying.md)")
        g.add_argument("--replan", action="store_true",
                       help=f"re-plan with no restart when nodes join or leave for good ({how}): solve again on the "
                            "nodes there, load the new plan's shards beside the old ones, switch routing, drain and "
                            "unload the old pipelines")
        g.add_argument("--cluster", metavar="FILE",
                       help="with --replan: the cluster to plan on (default: the plan's cluster section)")
        g.add_argument("--replan-poll", type=float, default=2.0, metavar="SECONDS",
                       help="with --replan: how often the node list is read (default 2)")
        g.add_argument("--replan-grace", type=float, default=10.0, metavar="SECONDS",
                       help="with --replan: a node missing this long has left for good (default 10)")
        g.add_argument("--replan-time-limit", type=float, default=10.0, metavar="SECONDS",
                       help="with --replan: the solver's time limit (default 10)")
        g.add_argument("--replan-margin", type=float, default=0.05, metavar="FRACTION",
                       help="with --replan: switch when the new plan predicts at least 1 + FRACTION times the "
                            "current one's throughput, or the current one lost a pipeline (default 0.05)")
        g.add_argument("--replan-drain-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="with --replan: a replaced pipeline still busy after SECONDS has its requests moved to "
                            "the new pipelines, prefilled again there (default 120)")
    drain_arg(sv)
    replan_args(sv, "a node of the cluster file whose `hexplan node` starts answering joins; one silent for "
                    "--replan-grace seconds leaves")
    policy_args(sv)
    sv.add_argument("--prefill-chunk", type=int,
                    help="prompt tokens per step while a micro-batch has sequences decoding (chunked prefill; "
                         "default batch x prompt / output tokens of the plan's workload)")
    tls_args(sv)
    sv.add_argument("--auth-token-file", metavar="FILE",
                    help="a file holding the token the node executors require (`hexplan node --auth-token-file`); "
                         "sent on every call to them and their stages. Clients of the gateway are not authenticated")
    http_args(sv)
    log_args(sv)

    la = sub.add_parser("launch", help="start every node executor of a plan and the gateway on this host")
    la.add_argument("plan", help="plan file")
    la.add_argument("--checkpoint", required=True, help="Hugging Face safetensors checkpoint directory")
    la.add_argument("--listen", default="127.0.0.1:50051", help="gateway HOST:PORT (default 127.0.0.1:50051; port 0 = any)")
    la.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    la.add_argument("--threads", type=int, help="CPU threads per worker process (default: cores / workers)")
    drain_arg(la)
    replan_args(la, "with --ray only: Ray's node list")
    policy_args(la)
    tls_args(la)
    la.add_argument("--auth-token-file", metavar="FILE",
                    help="the token the node executors started here require (default: a fresh random one)")
    la.add_argument("--ray", metavar="ADDRESS",
                    help="start the node executors as Ray actors on the Ray cluster at ADDRESS (HOST:PORT of its "
                         "GCS), each pinned to the machine the plan names; Ray restarts a dead one and the gateway "
                         "(here) reloads its shards. Needs the [ray] extra; see docs/ray.md")
    http_args(la)
    log_args(la)

    ge = sub.add_parser("generate", help="send one request to a gateway and print the tokens")
    ge.add_argument("--target", required=True, help="gateway HOST:PORT")
    src = ge.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (the checkpoint needs a tokenizer)")
    src.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    ge.add_argument("--max-new-tokens", type=int, default=32)
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float)
    ge.add_argument("--seed", type=int)
    ge.add_argument("--timeout", type=float, default=600, help="deadline in seconds (default 600)")
    ge.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="first wait up to SECONDS for the gateway to serve (polls its gRPC health service; "
                         "for right after `hexplan launch ... &`; default 0: do not wait)")
    ge.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ..., "finish_reason": ...}')
    ge.add_argument("--prefill-only", action="store_true",
                    help="score the prompt instead (Prefill): print the most likely next tokens; with --json "
                         "the last token's logits (and hidden state with --hidden)")
    ge.add_argument("--hidden", action="store_true", help="--prefill-only: also return the last token's hidden state")
    tls_args(ge, server=False)

    st = sub.add_parser("status", help="ask a gateway for its state: pipelines live or down, requests in flight, KV per stage",
                        description="Print the gateway's Status: per pipeline its state (live, down: a node or stage does "
                                    "not answer, suspect: a step stalled), requests in flight and each stage's sequences "
                                    "and KV bytes. Exit status 0 when it serves, 1 when it answers but serves nothing (no "
                                    "live pipeline, or draining), 2 when it cannot be reached.")
    st.add_argument("--target", required=True, help="gateway HOST:PORT")
    st.add_argument("--timeout", type=float, default=10, help="deadline in seconds (default 10)")
    st.add_argument("--json", action="store_true", help="print the Status as JSON")
    tls_args(st, server=False)

    pf = sub.add_parser("profile", help="measure per-layer decode and prefill times of a checkpoint on this machine",
                        description="Load a few layers of a Hugging Face safetensors checkpoint with the executor's own "
                                    "stage code, at a served worker's thread count, time decode steps against batch size, "
                                    "prompts against their length and the LM head against logits rows (median of "
                                    "--repeats after --warmup), and write the cluster-file section "
                                    "gpu_types.GPU.profiles.MODEL: {decode_ms, prefill_ms} (ms per layer at TP 1), "
                                    "lm_head_ms (ms per step at TP 1); with --tp d > 1 the same tables as by_tp.d (the "
                                    "TP-d group's own) and allreduce_ms (ms per all-reduce) with allreduce_tp. The cost "
                                    "model then uses them instead of its rooflines for that GPU type and model. Progress "
                                    "goes to stderr; stdout carries only the YAML. See "
                                    "docs/cost-model.md, 'Measured profiles'.")
    pf.add_argument("--checkpoint", required=True, help="Hugging Face safetensors checkpoint directory")
    pf.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu; TP rank r on cuda:r)")
    pf.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="weights and activations, as `hexplan serve --dtype` (default float32): profile what you serve")
    pf.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel degree: one process per rank (gloo on 127.0.0.1, or NCCL); the tables hold the "
                         "slowest rank's compute time (all-reduces taken out) x TP, the TP-1 figure the cost model divides "
                         "by TP, written as by_tp.TP (what groups of that degree are charged), and allreduce_ms the rest "
                         "of the step per all-reduce (default 1)")
    pf.add_argument("--gpu-type", help="GPU type the profile is for (default: cpu with --device cpu; with cuda the "
                                       "catalog type the device's name matches)")
    pf.add_argument("--model", help="model name the profile is for (default: the name `hexplan solve --model DIR` gives "
                                    "the checkpoint, its directory's name); a profile is used only for that name")
    pf.add_argument("-o", "--output", help="file to write the section to ('-': stdout; default stdout, or nothing with --merge)")
    pf.add_argument("--merge", metavar="CLUSTER.yaml",
                    help="add or replace the measured tables in gpu_types.GPU.profiles.MODEL of this cluster file, "
                         "keeping the rest of it (comments too, where the file's layout allows; stderr says when it did "
                         "not): a TP-1 run replaces the TP-1 tables, a --tp d run by_tp.d and allreduce_ms, each keeping "
                         "the other's")
    g = pf.add_argument_group("grid")
    g.add_argument("--decode-batches", metavar="B,B,...",
                   help="decode batch sizes, also the LM head's rows (default: 1,2,...,16,32,64 on the CPU, "
                        "1,2,4,8,16,32,64 on cuda)")
    g.add_argument("--prefill-tokens", default="16,32,64,128,256,512", metavar="P,P,...",
                   help="prompt lengths (default 16,32,64,128,256,512; lengths past the model's positions are left out)")
    g.add_argument("--context", type=int, help="KV positions each decode sequence holds (default 576, the planner's "
                                               "default mean decode context, at most half the model's positions)")
    g.add_argument("--layers", type=int, help="layers to load and time; per layer = step / layers (default 4, or all if fewer)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per point; the median counts (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per point first (default 1)")
    g.add_argument("--served", action="store_true",
                   help="time decode steps and prompts through a served stage worker (a local `hexplan node`, "
                        "Forward calls over gRPC, logits back) instead of in this process: what a served step costs on "
                        "a CPU, where the two differ most; and, through a second 1-layer shard, a call's own cost "
                        "(call_ms) apart from the layers' (TP 1 only; the LM head is still timed here)")
    g.add_argument("--threads", type=int, help="CPU threads per process, as a served worker has them (default: cores / TP, "
                                               "what `hexplan launch` gives each worker of a one-stage plan; a plan of W "
                                               "workers on one machine gets cores / W)")

    dc = sub.add_parser("discover", help="write a cluster spec from a running Ray cluster, links measured",
                        description="Read a Ray cluster's nodes (GPU type, count, IP), measure every pair's bandwidth "
                                    "and latency with probe actors, group nodes into regions by latency and write a "
                                    "cluster YAML. Needs the [ray] extra. See docs/ray.md.")
    dc.add_argument("--ray", required=True, metavar="ADDRESS", help="the Ray cluster's HOST:PORT (its GCS)")
    dc.add_argument("-o", "--output", default="-", help="cluster file to write (default '-': stdout)")
    dc.add_argument("--name", default="ray-cluster", help="the cluster's name (default ray-cluster)")
    dc.add_argument("--default-gpu-type", default="cpu",
                    help="GPU type of nodes Ray cannot type (no GPU, or an unknown accelerator type); they get a "
                         "FILL IN comment (default cpu: one CPU worker of the executor)")
    dc.add_argument("--cpu-workers", type=int, default=1, help="count of a node without GPUs (default 1)")
    dc.add_argument("--probe-mb", type=float, default=4.0, help="MB sent per bandwidth probe (default 4)")
    dc.add_argument("--probe-timeout", type=float, default=10.0, help="seconds per node pair's probes (default 10)")
    dc.add_argument("--region-latency-ms", type=float, default=2.0,
                    help="nodes joined by links of lower one-way latency form one region (default 2)")

    sub.add_parser("gpus", help="list the built-in GPU catalog")
    sub.add_parser("models", help="list the built-in models")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except HexplanError as e:
        msg = " ".join(str(e).splitlines()) or type(e).__name__  # the contract: exactly one line
        print(f"hexplan: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hexplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


# ---- commands ---------------------------------------------------------------------------

def cmd_solve(args) -> int:
    from .solver import SolveOptions, solve

    cluster = load_cluster(args.cluster)
    model = load_model(args.model)
    try:
        workload = Workload(args.prompt_tokens, args.output_tokens, args.batch_size, args.concurrency,
                            args.interleave)
    except SpecError as e:  # name the command-line flag, not the dataclass field
        raise SpecError(e.message, field="--" + (e.field or "workload").replace("_", "-")) from None
    # --time-limit is the command's wall time: the interpreter's start and the imports (about
    # 0.5 s) and writing the plan come out of the solver's share
    limit = args.time_limit
    if isinstance(limit, (int, float)) and limit > 0:
        limit = max(min(limit, 0.5), limit - _seconds_since_start() - 0.05)
    opts = SolveOptions(objective=args.objective, slo_tpot_ms=args.slo_tpot_ms, slo_ttft_ms=args.slo_ttft_ms,
                        time_limit=limit, seed=args.seed, backend=args.solver, workload=workload,
                        max_pipelines=args.max_pipelines, lp_backend=args.lp_backend,
                        int_backend=args.int_backend, shift=args.shift)
    from .solver.optimizer import check_options
    try:   # before anything is printed: a missing OR-Tools is a usage error naming the option
        check_options(opts)
    except SpecError as e:
        if e.field in ("solver", "lp_backend", "int_backend"):
            raise SpecError(e.message, field="--" + e.field.replace("_", "-")) from None
        raise
    if args.max_pipelines is not None and args.max_pipelines < 1:
        raise SpecError("must be at least 1", field="--max-pipelines")
    err = sys.stderr
    if not args.quiet:
        print(f"hexplan: planning {model.name} on {cluster.name} ({_gpu_summary(cluster)}), "
              f"objective {args.objective}, time limit {args.time_limit:g}s", file=err)
    progress = None if args.quiet else _Progress(err)
    try:
        plan = solve(cluster, model, opts, progress)
    except InfeasibleError as e:  # say which cluster file the request was infeasible on
        raise InfeasibleError(f"{args.cluster}: {e}") from None
    out = args.output or f"{_slug(cluster.name)}-{_slug(model.name)}.plan.{args.format}"
    text = plan.dump(args.format)
    table_stream = sys.stderr if out == "-" else sys.stdout
    print(format_plan(plan, cluster), file=table_stream)
    for note in shared_host_notes(plan, cluster):
        print(f"hexplan: note: {note}", file=sys.stderr)
    if out == "-":
        sys.stdout.write(text)
    else:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise SpecError(f"cannot write the plan: {e.strerror or e}", file=out, field="--output") from None
        print(f"hexplan: plan written to {out}", file=sys.stderr)   # a note: stdout is the table
    return 0


_IMPORTED = time.monotonic()


def _seconds_since_start() -> float:
    """Seconds since this process started (Linux: /proc), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


class _Progress:
    def __init__(self, stream):
        self.stream = stream
        self.last_inc = -1.0

    def __call__(self, event, elapsed=0.0, **info):
        if event == "heartbeat":   # every few seconds, whatever the phase (solver/optimizer.py)
            bd = info.get("bound")
            msg = (f"{info.get('phase', '?')}: plan {info.get('incumbent') or 0:.1f} tokens/s"
                   + (f", upper bound {bd:.1f}" if bd is not None and bd < 1e300 else ""))
            if info.get("milp_incumbent") is not None:
                msg += f" (MILP incumbent {info['milp_incumbent']:.1f}, relaxed model)"
        elif "incumbent" in info:
            inc, bd = info["incumbent"], info.get("bound")
            if inc <= self.last_inc + 1e-9:
                return
            self.last_inc = inc
            msg = f"MILP incumbent {inc:.1f} tokens/s (relaxed model), bound {bd:.1f}" if bd and bd < 1e300 \
                else f"MILP incumbent {inc:.1f} tokens/s (relaxed model)"
        elif "message" in info:
            msg = info["message"]
        elif event == "heuristic":
            if not info.get("throughput") and not info.get("done"):
                return
            msg = f"heuristic plan {info.get('throughput', 0):.1f} tokens/s" + (" (done)" if info.get("done") else "")
        elif event == "milp":
            msg = f"MILP {info.get('status')}: plan {info.get('throughput', 0):.1f} tokens/s, upper bound {info.get('bound', 0):.1f}"
        elif event == "patterns":
            msg = f"column generation: plan {info.get('throughput', 0):.1f} tokens/s, upper bound {info.get('bound', 0):.1f}"
        elif event == "latency":
            msg = f"fastest pipeline: {info.get('tpot_ms', 0):.2f} ms per output token"
        elif event == "done":
            return
        else:
            msg = f"{event} {info}"
        print(f"[{elapsed:6.1f}s] {msg}", file=self.stream, flush=True)


def cmd_compare(args) -> int:
    from .compare import compare
    from .simulator import load_trace
    from .simulator.command import _workload
    from .solver import SolveOptions

    cluster = load_cluster(args.cluster)
    model = load_model(args.model)
    try:
        workload = Workload(args.prompt_tokens, args.output_tokens, args.batch_size, args.concurrency)
    except SpecError as e:
        raise SpecError(e.message, field="--" + (e.field or "workload").replace("_", "-")) from None
    opts = SolveOptions(time_limit=args.time_limit, seed=args.seed, workload=workload)
    spec = None
    if args.rate is not None or args.workload:
        if args.rate is not None and not (args.rate > 0):
            raise SpecError(f"must be positive, got {args.rate:g}", field="--rate")
        args.sweep_rate, args.warmup = False, None
        spec = _workload(args, load_trace(args.workload) if args.workload else ())
    planners = [p.strip() for p in args.planners.split(",") if p.strip()] if args.planners else None
    progress = (lambda msg: None) if args.json else (lambda msg: print(f"hexplan: {msg}", file=sys.stderr, flush=True))
    rows = compare(cluster, model, opts, spec, args.seed, planners, args.budget_per_hour, progress)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    table = [(r["planner"], f(r["predicted_throughput"], ".1f"), f(r["simulated_throughput"], ".1f"),
              f(r["p50_latency_s"], ".2f"), f(r["p90_latency_s"], ".2f"), f(r["solve_seconds"], ".1f"),
              f(r["ratio"], ".2f"), r.get("gpus") or "-", r.get("reason", "")[:60]) for r in rows]
    head = ("planner", "predicted tok/s", "simulated tok/s", "P50 s", "P90 s", "solve s", "vs hexplan", "GPUs", "note")
    if args.budget_per_hour is not None:
        table = [t[:-1] + (f"${r.get('price_per_hour', 0):.2f}/h", t[-1]) for t, r in zip(table, rows)]
        head = head[:-1] + ("price", "note")
    print(f"{model.name} on {cluster.name} ({_gpu_summary(cluster)}, ${cluster.price_per_hour:.2f}/h)")
    print(_table(head, table))
    return 0


def cmd_validate(args) -> int:
    cluster = load_cluster(args.cluster)
    print(f"{args.cluster}: ok: cluster {cluster.name!r}, {len(cluster.nodes)} nodes, {_gpu_summary(cluster)}, "
          f"{cluster.total_memory / 1e9:.0f} GB GPU memory" + (f", regions {', '.join(r for r in cluster.regions if r)}"
                                                                if any(cluster.regions) else ""))
    if args.plan:
        plan = load_plan(args.plan)
        _check_plan_file(plan, cluster, args.plan)
        print(f"{args.plan}: ok: {len(plan.pipelines)} pipelines, {plan.num_gpus} GPUs")
    return 0


def _check_plan_file(plan, cluster, path) -> None:
    """Raise one short line when the plan does not fit the cluster (validate.describe_problems)."""
    try:
        problems = validate_plan(plan, cluster)
    except SpecError as e:
        raise e.located(str(path)) from None
    if problems:
        raise SpecError(describe_problems(plan, cluster, problems), file=str(path), field="plan")


def cmd_show(args) -> int:
    plan = load_plan(args.plan)
    cluster = load_cluster(args.cluster) if args.cluster else None
    if cluster is not None:
        _check_plan_file(plan, cluster, args.plan)
    print(format_plan(plan, cluster))
    return 0


def cmd_gpus(args) -> int:
    rows = [(g.name, f"{g.memory / 1e9:.0f} GB", f"{g.memory_bandwidth / 1e9:.0f} GB/s", f"{g.fp16_tflops:g}",
             f"{g.interconnect / 1e9:.0f} GB/s", f"{g.price_per_hour:.2f}") for g in CATALOG.values()]
    print(_table(("gpu", "memory", "mem bandwidth", "fp16 TFLOPS", "intra-node", "$/hour"), rows))
    return 0


def cmd_models(args) -> int:
    rows = [(m.name, m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.vocab_size,
             m.dtype, f"{m.total_params / 1e9:.1f}B") for m in BUILTIN_MODELS.values()]
    print(_table(("model", "layers", "hidden", "intermediate", "heads", "kv heads", "vocab", "dtype", "params"), rows))
    return 0


def cmd_simulate(args) -> int:
    from .simulator.command import run_simulate

    return run_simulate(args)


def _executor():
    """Import the executor lazily: the planner runs without torch and grpc."""
    try:
        import grpc  # noqa: F401
        import torch  # noqa: F401

        from . import executor
    except ImportError as e:
        raise HexplanError(f"the executor needs torch and grpc ({e.name} is missing): "
                           "pip install torch and then pip install 'hexplan[executor]'") from None
    return executor


def _gateway_torch_threads():
    """A gateway process's own torch work is small (token tensors, sampling a step's rows); one
    torch thread does it. Its micro-batch loops run on several threads, each of which would get
    a team of OpenMP threads as large as the machine, spinning on the cores the stages compute
    on when they share the machine (`hexplan launch`; worker.ComputeThread)."""
    import torch
    torch.set_num_threads(1)


def _tls(args):
    from .executor.wire import Tls

    cert, key, ca = getattr(args, "tls_cert", None), getattr(args, "tls_key", None), args.tls_ca
    if bool(cert) != bool(key):
        raise SpecError("give both --tls-cert and --tls-key", field="--tls-cert")
    for f, v in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if v and not Path(v).is_file():
            raise SpecError(f"file not found: {v}", field=f)
    if ca and not cert and hasattr(args, "tls_cert"):
        # a server with a CA verifies its callers' certificates and presents its own to the
        # nodes and stages it calls: it needs a certificate
        raise SpecError("--tls-ca on a server needs --tls-cert and --tls-key (its own certificate)", field="--tls-cert")
    return Tls(cert, key, ca) if (cert or ca) else None


def _auth_token(args, environment: bool = False) -> str | None:
    """The internal-API token: --auth-token-file, else (``environment``: `hexplan node`) the
    HEXPLAN_AUTH_TOKEN variable `hexplan launch` sets, removed from the environment once read
    so the node's stage workers do not inherit it (they get it in their spec)."""
    import os

    from .executor.wire import TOKEN_ENV

    from_env = os.environ.pop(TOKEN_ENV, None) if environment else None
    path = getattr(args, "auth_token_file", None)
    if not path:
        return from_env or None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}", field="--auth-token-file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text", field="--auth-token-file") from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise SpecError(f"{path}: expected one token (printable, no spaces)", field="--auth-token-file")
    return token


def _listen(value: str, flag: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise SpecError(f"expected HOST:PORT, got {value!r}", field=flag)
    return value


def cmd_node(args) -> int:
    configure_logging(args.log_level, args.log_format)
    _executor()
    from .executor.node import exposure_problem, serve_node, unauthenticated_warning

    listen = _listen(args.listen, "--listen")
    host = listen.rpartition(":")[0]
    tls, token = _tls(args), _auth_token(args, environment=True)
    problem = exposure_problem(host.strip("[]"), token, tls)
    if problem:
        raise SpecError(problem, field="--listen")
    for root in args.checkpoint_root:
        if not Path(root).is_dir():
            raise SpecError(f"not a directory: {root}", field="--checkpoint-root")
    warning = unauthenticated_warning(args.name, token, tls)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    serve_node(listen, args.name, tls, args.threads,
               on_ready=lambda port: print(f"hexplan node {args.name} listening on {host}:{port}", flush=True),
               parent_pid=args.parent_pid, parent_death_signal=args.parent_death_signal,
               auth_token=token, checkpoint_roots=args.checkpoint_root)
    from .executor.lifecycle import exit_later
    exit_later(2.0, code=0)   # stopped: a handler thread still blocked (a LoadShard waiting) must not keep us
    return 0


def cmd_serve(args) -> int:
    configure_logging(args.log_level, args.log_format)
    _executor()
    from .executor.gateway import Gateway, GatewayError
    from .executor.lifecycle import StopSignals, drain_and_stop
    from .executor.servicer import serve_gateway

    _gateway_torch_threads()
    drain_timeout = _drain_timeout(args)
    faults = _fault_args(args)
    http = _http_args(args)
    plan = load_plan(args.plan)
    nodes = {n["name"]: n["address"] for n in (plan.cluster or {}).get("nodes", []) if n.get("address")}
    for item in filter(None, args.nodes.split(",")):
        name, sep, addr = item.partition("=")
        if not sep:
            raise SpecError(f"expected NAME=HOST:PORT, got {item!r}", field="--nodes")
        nodes[name.strip()] = _listen(addr.strip(), "--nodes")
    for flag in ("max_batch", "prefill_chunk"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise SpecError(f"must be a positive integer, got {v}", field="--" + flag.replace("_", "-"))
    policy, quantum = _policy(args)
    shift_threshold = _shift_threshold(args)
    tls = _tls(args)
    replan = _replan_options(args)
    cluster = _replan_cluster(args, plan) if replan is not None else None
    for n in (cluster.nodes if cluster is not None else ()):   # --cluster's addresses, where not given
        if n.address:
            nodes.setdefault(n.name, n.address)
    try:
        gw = Gateway(plan, args.checkpoint, nodes, tls, args.dtype, max_batch=args.max_batch,
                     prefill_chunk=args.prefill_chunk, policy=policy, mlfq_quantum_s=quantum,
                     interleave=args.interleave, matmul_pieces=args.matmul_pieces,
                     auth_token=_auth_token(args), shift_threshold=shift_threshold)
        gw.stall_timeout_s, gw.recovery_wait_s = faults["stall_timeout_s"], faults["recovery_wait_s"]
        gw.start()
    except GatewayError as e:
        raise HexplanError(str(e)) from None
    server, port = serve_gateway(gw, _listen(args.listen, "--listen"), tls)
    front = None
    if http:
        from .executor.http import default_model_name, serve_http
        try:
            front = serve_http(gw, http["http"], http["served_model_name"] or default_model_name(args.checkpoint),
                               chat_template=http["chat_template"], max_queue=http["max_queue"])
        except OSError as e:
            server.stop(grace=0)
            gw.stop()
            raise SpecError(f"cannot listen on {http['http']}: {e.strerror or e}", field="--http") from None
    replanner = None
    if replan is not None:
        from .executor.replan import ProbedNodes, Replanner
        addresses = {n.name: n.address for n in cluster.nodes if n.address}
        addresses.update(nodes)
        replanner = Replanner(gw, cluster, ProbedNodes(gw, addresses), replan)
        replanner.start()
    signals = StopSignals()
    print(f"hexplan: ready: serving {plan.model.name} on {args.listen.rpartition(':')[0]}:{port}"
          + (f"; HTTP on {front.url}" if front is not None else ""), flush=True)
    signals.wait()
    drain_and_stop(gw, server, drain_timeout, hurry=signals.hurry, http=front)
    if replanner is not None:
        replanner.stop()
    print("hexplan: stopped", flush=True)
    return 0


def _replan_options(args):
    """--replan's options, checked (each error names its flag), or None without --replan."""
    if not args.replan:
        if args.cluster is not None:
            raise SpecError("only with --replan", field="--cluster")
        return None
    from .executor.replan import ReplanOptions
    for flag, positive in (("replan_poll", True), ("replan_grace", False), ("replan_time_limit", True),
                           ("replan_margin", False), ("replan_drain_timeout", False)):
        v = getattr(args, flag)
        if not ((0 < v if positive else 0 <= v) and v < float("inf")):
            raise SpecError(f"must be a number {'> 0' if positive else '>= 0'}, got {v:g}",
                            field="--" + flag.replace("_", "-"))
    return ReplanOptions(poll_s=args.replan_poll, grace_s=args.replan_grace, time_limit_s=args.replan_time_limit,
                         margin=args.replan_margin, drain_timeout_s=args.replan_drain_timeout)


def _replan_cluster(args, plan, required: bool = True):
    """The cluster --replan plans on: --cluster, else the plan's cluster section (None when it has
    none and ``required`` is False: Ray's nodes then)."""
    from .plan import plan_cluster
    if args.cluster is not None:
        cluster = load_cluster(args.cluster)
    else:
        try:
            cluster = plan_cluster(plan)
        except SpecError as e:
            if not required:
                return None
            raise SpecError(f"--replan needs the cluster to plan on, and the plan's {e.message}: give --cluster FILE",
                            field="--cluster") from None
    missing = sorted({s.node for p in plan.pipelines for s in p.stages} - {n.name for n in cluster.nodes})
    if missing:
        raise SpecError(f"the plan's node(s) {', '.join(missing)} are not in the cluster", field="--cluster")
    return cluster


def _fault_args(args) -> dict:
    for flag, low in (("stall_timeout", 0.0), ("recovery_wait", -1e-12)):
        v = getattr(args, flag)
        if not (low < v < float("inf")):
            raise SpecError(f"must be a number of seconds {'> 0' if low == 0 else '>= 0'}, got {v:g}",
                            field="--" + flag.replace("_", "-"))
    return {"stall_timeout_s": args.stall_timeout, "recovery_wait_s": args.recovery_wait}


def _drain_timeout(args) -> float:
    v = args.drain_timeout
    if not 0 <= v < float("inf"):
        raise SpecError(f"must be a number of seconds >= 0, got {v:g}", field="--drain-timeout")
    return v


def _shift_threshold(args) -> int | None:
    v = args.shift_threshold
    if v is not None and v < 0:
        raise SpecError(f"must be a number of tokens >= 0, got {v}", field="--shift-threshold")
    return v


def _policy(args) -> tuple[str, float | None]:
    if args.interleave is not None and args.interleave < 1:
        raise SpecError(f"must be an integer >= 1, got {args.interleave}", field="--interleave")
    if args.matmul_pieces < 1:
        raise SpecError(f"must be an integer >= 1, got {args.matmul_pieces}", field="--matmul-pieces")
    if args.policy not in ("fcfs", "mlfq"):
        raise SpecError(f"must be 'fcfs' or 'mlfq', got {args.policy!r}", field="--policy")
    q = args.mlfq_quantum_ms
    if q is not None and not (0 < q < float("inf")):
        raise SpecError(f"must be a positive number of milliseconds, got {q:g}", field="--mlfq-quantum-ms")
    return args.policy, (q / 1e3 if q is not None else None)


def cmd_launch(args) -> int:
    configure_logging(args.log_level, args.log_format)   # its node executors get the same (launch.start_node)
    _executor()
    from .executor.gateway import GatewayError
    from .executor.launch import run_launch

    _gateway_torch_threads()
    drain_timeout = _drain_timeout(args)
    faults = _fault_args(args)
    http = _http_args(args)
    plan = load_plan(args.plan)
    policy, quantum = _policy(args)
    _shift_threshold(args)
    if args.ray is not None:
        return _launch_ray(args, plan, policy, quantum, drain_timeout, faults, http)
    if args.replan:
        raise SpecError("needs --ray: a local launch has no other machines to join or leave (without Ray, "
                        "use `hexplan node` on each machine and `hexplan serve --replan --cluster FILE`)",
                        field="--replan")
    _replan_options(args)
    try:
        return run_launch(plan, args.checkpoint, _listen(args.listen, "--listen"), _tls(args), args.dtype, args.threads,
                          policy=policy, mlfq_quantum_s=quantum, interleave=args.interleave,
                          matmul_pieces=args.matmul_pieces, drain_timeout=drain_timeout,
                          auth_token=_auth_token(args), shift_threshold=_shift_threshold(args), **faults, **http)
    except (GatewayError, RuntimeError) as e:
        raise HexplanError(str(e)) from None


def _launch_ray(args, plan, policy, quantum, drain_timeout, faults, http) -> int:
    from .discover import check_address
    from .executor.gateway import GatewayError

    check_address(args.ray, "--ray")
    replan = _replan_options(args)
    cluster = _replan_cluster(args, plan, required=False) if replan is not None else None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise HexplanError("--ray needs Ray: pip install 'hexplan[ray]'") from None
    from .executor.ray_cluster import run_launch_ray
    try:
        return run_launch_ray(plan, args.checkpoint, args.ray, _listen(args.listen, "--listen"), _tls(args), args.dtype,
                              args.threads, policy=policy, mlfq_quantum_s=quantum, interleave=args.interleave,
                              matmul_pieces=args.matmul_pieces, drain_timeout=drain_timeout,
                              auth_token=_auth_token(args), shift_threshold=_shift_threshold(args),
                              replan=replan, cluster=cluster, **faults, **http)
    except (GatewayError, RuntimeError) as e:
        raise HexplanError(str(e)) from None


def _http_args(args) -> dict:
    """The HTTP front's options, checked (each error names its flag), or {} without --http."""
    if args.http is None:
        for flag in ("served_model_name", "chat_template", "max_queue"):
            if getattr(args, flag) is not None:
                raise SpecError("only with --http", field="--" + flag.replace("_", "-"))
        return {}
    _listen(args.http, "--http")
    if args.max_queue is not None and args.max_queue < 0:
        raise SpecError(f"must be an integer >= 0, got {args.max_queue}", field="--max-queue")
    name = args.served_model_name
    if name is not None and (not name.strip() or not name.isprintable()):
        raise SpecError(f"expected a printable, non-empty name, got {name!r}", field="--served-model-name")
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(f"cannot read {args.chat_template}: {e.strerror or e}", field="--chat-template") from None
        except UnicodeDecodeError:
            raise SpecError(f"{args.chat_template}: not UTF-8 text", field="--chat-template") from None
        try:
            import jinja2
            jinja2.Environment().parse(template)
        except ImportError:
            pass
        except jinja2.TemplateSyntaxError as e:
            raise SpecError(f"{args.chat_template}:{e.lineno}: not a Jinja template: {e.message}",
                            field="--chat-template") from None
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise HexplanError(f"--http needs fastapi and uvicorn ({e.name} is missing): "
                           "pip install 'hexplan[http]'") from None
    return {"http": args.http, "served_model_name": name, "chat_template": template, "max_queue": args.max_queue}


def cmd_generate(args) -> int:
    _executor()
    from .executor.client import run_generate

    _listen(args.target, "--target")
    if args.hidden and not args.prefill_only:
        raise SpecError("only with --prefill-only (a generation returns tokens)", field="--hidden")
    if not 0 <= args.wait < float("inf"):
        raise SpecError(f"must be a number of seconds >= 0, got {args.wait:g}", field="--wait")
    return run_generate(args)


def cmd_status(args) -> int:
    _executor()
    from .executor.client import run_status

    _listen(args.target, "--target")
    if not 0 < args.timeout < float("inf"):
        raise SpecError(f"must be a positive number of seconds, got {args.timeout:g}", field="--timeout")
    return run_status(args)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SpecError(f"expected comma-separated positive integers, got {text!r}", field=flag) from None
    if not values or values[0] < 1:
        raise SpecError(f"expected comma-separated positive integers, got {text!r}", field=flag)
    return tuple(values)


def _ms(v: float) -> float:
    """A table value: 4 significant digits, never 0 (the cluster format wants positive times)."""
    return max(float(f"{v:.4g}"), 1e-6)


def _merged_profile(old: dict, new: dict, tp: int) -> tuple[dict, str]:
    """A cluster file's profile entry ``old`` with what a ``hexplan profile --tp tp`` run measured
    (``new``) put in, and what of ``old`` stayed, in words ('' when nothing did). A TP-1 run
    replaces the TP-1 tables (``call_ms`` too: one run's split) and keeps the other degrees' tables
    and the all-reduce's; a TP-d run replaces ``by_tp.d`` and the all-reduce's table and keeps the
    rest."""
    degrees = {k: v for k, v in (old.get("by_tp") or {}).items() if k != tp} if isinstance(old.get("by_tp"), dict) else {}
    if tp == 1:
        entry = dict(new)
        keep = [k for k in ("allreduce_ms", "allreduce_tp") if k in old]
    else:
        entry = {k: v for k, v in old.items() if k not in ("by_tp", "allreduce_ms", "allreduce_tp")}
        entry.update({k: v for k, v in new.items() if k != "by_tp"})
        keep = [k for k in entry if k not in new]
        degrees[tp] = new["by_tp"][tp]
    for k in keep:
        entry.setdefault(k, old[k])
    if degrees:
        entry["by_tp"] = dict(sorted(degrees.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0))
    kept = keep + [f"by_tp.{d}" for d in degrees if d != tp]
    return entry, ", ".join(kept)


def cmd_profile(args) -> int:
    from .yamlio import dumps, load_document, set_entry

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise SpecError(f"not a directory: {ckpt}", field="--checkpoint")
    if not (ckpt / "config.json").is_file():
        raise SpecError(f"no config.json in {ckpt} (a Hugging Face checkpoint directory)", field="--checkpoint")
    if not any((ckpt / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise SpecError(f"no model.safetensors or model.safetensors.index.json in {ckpt}", field="--checkpoint")
    model = load_model(str(ckpt))
    name = model.name if args.model is None else args.model
    if not name.strip():
        raise SpecError("must not be empty", field="--model")
    for flag, low in (("tp", 1), ("layers", 1), ("context", 1), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise SpecError(f"must be an integer >= {low}, got {v}", field="--" + flag)
    why = model.tp_degree_ok(args.tp)
    if why:
        raise SpecError(why, field="--tp")
    if args.served and args.tp != 1:
        raise SpecError("measures TP 1 stages only; profile the all-reduces with --tp without --served", field="--served")
    layers = args.layers or min(4, model.num_layers)
    if layers > model.num_layers:
        raise SpecError(f"{layers} is more than the model's {model.num_layers} layers", field="--layers")
    decode = _int_list(args.decode_batches, "--decode-batches") if args.decode_batches is not None else None
    prefill = _int_list(args.prefill_tokens, "--prefill-tokens")
    positions = model.max_position_embeddings
    context = args.context or max(1, min(576, positions // 2))
    if context + 1 > positions:
        raise SpecError(f"{context} + 1 new token is past the model's {positions} positions", field="--context")
    if prefill[0] > positions:
        raise SpecError(f"every length is past the model's {positions} positions", field="--prefill-tokens")
    dropped = [p for p in prefill if p > positions]
    prefill = tuple(p for p in prefill if p <= positions)
    out = args.output or (None if args.merge else "-")
    if out not in (None, "-") and not Path(out).resolve().parent.is_dir():
        raise SpecError(f"no such directory: {Path(out).parent}", field="--output")
    merge_text = None
    if args.merge:
        cluster = load_cluster(args.merge)
        merge_text = Path(args.merge).read_text(encoding="utf-8")
        defined = load_document(args.merge)[0].get("gpu_types") or {}

    _executor()
    import torch

    from .gpus import catalog_name_for_device

    if args.device == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise SpecError(f"CUDA is not available ({why}); use --device cpu", field="--device")
        if args.tp > torch.cuda.device_count():
            raise SpecError(f"TP {args.tp} needs {args.tp} CUDA devices, {torch.cuda.device_count()} visible", field="--tp")
    gpu = args.gpu_type
    if gpu is None and args.device == "cpu":
        gpu = "cpu"
    elif gpu is None:
        dev = torch.cuda.get_device_name(0)
        gpu = catalog_name_for_device(dev, torch.cuda.get_device_properties(0).total_memory)
        if gpu is None:
            raise SpecError(f"the CUDA device {dev!r} matches no built-in GPU type; name its type (`hexplan gpus`, "
                            "or one your cluster file defines)", field="--gpu-type")
    if not gpu.strip():
        raise SpecError("must not be empty", field="--gpu-type")
    if args.merge:
        if gpu not in CATALOG and gpu not in defined:
            raise SpecError(f"{gpu!r} is neither a built-in GPU type nor defined in {args.merge}'s gpu_types",
                            field="--gpu-type")
        if not any(n.gpu.name == gpu for n in cluster.nodes):
            print(f"hexplan: note: no node of {args.merge} has GPU type {gpu}; the profile is stored but unused",
                  file=sys.stderr)

    from .executor.profile import ProfileSpec, default_decode_batches, profile_checkpoint

    decode = decode or default_decode_batches(args.device)
    spec = ProfileSpec(str(ckpt), args.device, args.dtype, args.tp, layers, context, decode, prefill,
                       args.warmup, args.repeats, args.threads)
    err = sys.stderr
    if dropped:
        print(f"hexplan: note: prompt lengths {', '.join(map(str, dropped))} left out: the model has {positions} "
              "positions", file=err)
    print(f"hexplan: profiling {name} (layers 0-{layers - 1} of {model.num_layers}, {args.dtype}, TP {args.tp}) on "
          f"{args.device} as GPU type {gpu}: {len(decode)} decode points at context {context}, {len(prefill)} prefill "
          f"points, median of {args.repeats} after {args.warmup} warm-up", file=err, flush=True)

    NOISY = 1.5   # slowest repetition over the fastest

    def progress(p, done, total):
        noisy = "  NOISY" if p.spread > NOISY else ""
        if p.kind == "head":
            print(f"hexplan: [{done:>2}/{total}] LM head {p.x:>5} rows: {p.ms:9.4f} ms/step at TP 1 (step "
                  f"{p.step_ms:.2f} ms, spread {p.spread:.2f}){noisy}", file=err, flush=True)
            return
        what = f"decode batch {p.x:>5}" if p.kind == "decode" else f"prefill {p.x:>5} tokens"
        comm = f", all-reduce {p.allreduce_ms:.2f} ms, {p.per_allreduce_ms:.3f} ms each" if args.tp > 1 else ""
        print(f"hexplan: [{done:>2}/{total}] {what}: {p.ms:9.4f} ms/layer at TP 1 (step {p.step_ms:.2f} ms{comm}, "
              f"spread {p.spread:.2f}){noisy}", file=err, flush=True)

    try:
        result = profile_checkpoint(spec, progress)
        if args.served:
            from .executor.profile_served import served_profile

            print(f"hexplan: decode and prefill again through a served worker ({len(decode)} batch sizes, "
                  f"{len(prefill)} prompt lengths"
                  + ("; then decode through a 1-layer shard to split each call's own cost from its layers'"
                     if layers > 1 else "") + ")", file=err, flush=True)

            def served_progress(p, done, total):
                if p.kind == "call":
                    print(f"hexplan: [{done:>2}/{total}] served 1-layer step batch {p.x:>5}: {p.step_ms:.2f} ms, the "
                          f"call's own {p.ms:.2f} ms at this batch (spread {p.spread:.2f}; the table makes it "
                          "non-decreasing over the batches)", file=err, flush=True)
                    return
                if p.kind == "prefill":
                    print(f"hexplan: [{done:>2}/{total}] served prefill {p.x:>5} tokens: {p.ms:9.4f} ms/layer at TP 1 "
                          f"with the call (step {p.step_ms:.2f} ms with the LM head, spread {p.spread:.2f})",
                          file=err, flush=True)
                    return
                print(f"hexplan: [{done:>2}/{total}] served decode batch {p.x:>5}: {p.ms:9.4f} ms/layer at TP 1 with "
                      f"the call (step {p.step_ms:.2f} ms with the LM head, mean context {p.context:.0f}, spread "
                      f"{p.spread:.2f})", file=err, flush=True)
            t_served = time.perf_counter()
            served = served_profile(spec, result.lm_head_ms, served_progress)
            result = dataclasses.replace(result, points=tuple(p for p in result.points if p.kind not in ("decode", "prefill"))
                                         + served, seconds=result.seconds + time.perf_counter() - t_served)
    except torch.OutOfMemoryError:
        raise HexplanError(f"out of memory on {args.device}: try fewer --layers or smaller --decode-batches / "
                           "--prefill-tokens") from None
    group = {"decode_ms": {x: _ms(v) for x, v in result.decode_ms.items()},
             "prefill_ms": {x: _ms(v) for x, v in result.prefill_ms.items()}}
    if result.lm_head_ms:
        group["lm_head_ms"] = {x: _ms(v) for x, v in result.lm_head_ms.items()}
    # TP 1: the profile's own tables; TP d: the degree's own (by_tp.d), which the cost model
    # charges groups of that degree by, beside the all-reduce's table
    tables = dict(group) if args.tp == 1 else {"by_tp": {args.tp: group}}
    if result.allreduce_ms:
        tables["allreduce_ms"] = {x: _ms(v) for x, v in result.allreduce_ms.items()}
        tables["allreduce_tp"] = args.tp
    if result.call_ms:
        tables["call_ms"] = {x: _ms(v) for x, v in result.call_ms.items()}
        ends = sorted(result.call_ms)
        print(f"hexplan: a call's own cost, made non-decreasing: {result.call_ms[ends[0]]:.2f} ms at {ends[0]} sequence(s) to "
              f"{result.call_ms[ends[-1]]:.2f} ms at {ends[-1]}", file=err, flush=True)
    print(f"hexplan: measured in {result.seconds:.1f} s on {result.device_name}", file=err, flush=True)
    noisy = [p for p in result.points if p.spread > NOISY]
    if noisy:
        print(f"hexplan: warning: {len(noisy)} of {len(result.points)} points varied by more than {NOISY:g}x between "
              "repetitions: is the machine busy? More --repeats, or fewer --threads than free cores, steady them",
              file=err, flush=True)
    where = "" if args.tp == 1 else f"by_tp.{args.tp}."
    norm = (f"the TP-{args.tp} group's own: its slowest rank's measured compute (all-reduces taken out) x {args.tp}, "
            f"what TP-{args.tp} groups of this GPU type are charged (docs/cost-model.md)" if args.tp > 1 else "measured")
    text = (f"# hexplan profile --checkpoint {ckpt} --device {args.device} --dtype {args.dtype} --tp {args.tp}\n"
            f"# {result.device_name}; layers 0-{layers - 1} of {model.num_layers}; decode context {context}; "
            f"median of {args.repeats} after {args.warmup} warm-up\n"
            f"# {where}decode_ms, {where}prefill_ms: ms per layer as at TP 1 ({norm}); x = decode batch size / "
            "prompt tokens\n"
            + ("# decode_ms, prefill_ms: through a served worker (--served: Forward calls to a local hexplan node, "
               "less the LM head's step" + (" and the call's own cost" if "call_ms" in tables else "") + ")\n"
               if args.served else "")
            + ("# call_ms: ms per Forward call to a stage beyond its layers and LM head (gRPC, (de)serialising, "
               "per-call work), from a served 1-layer shard, non-decreasing over the batches; x = sequences in "
               "the step\n" if "call_ms" in tables else "")
            + (f"# {where}lm_head_ms: ms per step as at TP 1 (final norm, LM head, logits out"
               + (f"; x {args.tp}" if args.tp > 1 else "") + "); x = logits rows\n" if "lm_head_ms" in group else "")
            + (f"# allreduce_ms: ms per all-reduce at TP {args.tp} (the step beyond the slowest rank's compute, "
               "over 2 x layers); x = rows of hidden state\n" if "allreduce_ms" in tables else "")
            + dumps({"gpu_types": {gpu: {"profiles": {name: tables}}}}))
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    elif out is not None:
        _write(out, text, "--output")
        print(f"hexplan: profile written to {out}", file=err)
    if args.merge:
        old = ((defined.get(gpu) or {}).get("profiles") or {}).get(name) if isinstance(defined.get(gpu), dict) else None
        entry, kept_old = _merged_profile(old if isinstance(old, dict) else {}, tables, args.tp)
        merged, kept = set_entry(merge_text, ("gpu_types", gpu, "profiles", name), entry, file=args.merge)
        loads_cluster(merged, file=args.merge)   # never write a file that does not load
        _write(args.merge, merged, "--merge")
        print(f"hexplan: gpu_types.{gpu}.profiles.{name} merged into {args.merge}"
              + (f", keeping its {kept_old}" if kept_old else "")
              + ("" if kept else " (rewritten from its data: its comments and layout were not kept)"), file=err)
    return 0


def cmd_discover(args) -> int:
    from .discover import discover

    if args.output != "-" and not Path(args.output).resolve().parent.is_dir():
        raise SpecError(f"no such directory: {Path(args.output).parent}", field="--output")
    text, facts = discover(args.ray, default_gpu_type=args.default_gpu_type, cpu_workers=args.cpu_workers,
                           probe_mb=args.probe_mb, probe_timeout=args.probe_timeout,
                           region_latency_ms=args.region_latency_ms, name=args.name,
                           progress=lambda msg: print(f"hexplan: {msg}", file=sys.stderr, flush=True))
    loads_cluster(text, file=args.output)       # never write a file that does not load
    if args.output == "-":
        sys.stdout.write(text)
    else:
        _write(args.output, text, "--output")
        print(f"hexplan: cluster written to {args.output}", file=sys.stderr)
    for node in facts["nodes"]:
        if node.note:
            print(f"hexplan: note: node {node.name} ({node.ip}): {node.note}", file=sys.stderr)
    return 0


def _write(path: str, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    import os
    import tempfile

    p, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.resolve().parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if p.exists():
            os.chmod(tmp, p.stat().st_mode & 0o7777)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise SpecError(f"cannot write {path}: {e.strerror or e}", field=flag) from None


_COMMANDS = {"compare": cmd_compare, "solve": cmd_solve, "validate": cmd_validate, "show": cmd_show, "gpus": cmd_gpus, "models": cmd_models,
             "node": cmd_node, "serve": cmd_serve, "launch": cmd_launch, "generate": cmd_generate,
             "profile": cmd_profile, "status": cmd_status}
_COMMANDS["simulate"] = cmd_simulate
_COMMANDS["discover"] = cmd_discover


# ---- rendering --------------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "plan"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
