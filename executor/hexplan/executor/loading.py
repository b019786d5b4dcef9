"""Starting the gateway: check the checkpoint against the plan, load every stage on its node
executor (``LoadShard``), load the tokenizer if the checkpoint has one."""
from __future__ import annotations

import json
import logging
from concurrent import futures
from pathlib import Path

import grpc

from hexplan import costmodel
from hexplan.errors import SpecError
from hexplan.models import ModelSpec, model_from_hf_config, read_hf_config
from hexplan.plan import Plan, Stage, plan_cluster
from hexplan.validate import plan_assumptions

from ._proto import hexplan_v1_pb2 as pb
from .shift import DEFAULT_SHIFT_THRESHOLD, shift_problem

log = logging.getLogger("hexplan.gateway")

LOAD_TIMEOUT_S = 900


class GatewayError(Exception):
    """A problem at start (bad checkpoint, unreachable node): the message says which."""


def check_checkpoint(checkpoint: str, model: ModelSpec) -> tuple[dict, ModelSpec]:
    """Read the checkpoint's config.json (hexplan.models, the one reader) and compare its shape
    with the plan's model; returns the config and the checkpoint's model."""
    path = Path(checkpoint) / "config.json"
    try:
        cfg = read_hf_config(path)
        have = model_from_hf_config(cfg, name=Path(checkpoint).name or str(checkpoint), file=str(path))
    except SpecError as e:
        raise GatewayError(f"checkpoint {e}") from None
    pairs = [("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"),
             ("intermediate_size", "intermediate_size"), ("num_attention_heads", "num_heads"),
             ("num_key_value_heads", "num_kv_heads"), ("vocab_size", "vocab_size")]
    diffs = [f"{ck} {getattr(have, mk)} vs {getattr(model, mk)}" for ck, mk in pairs
             if getattr(have, mk) != getattr(model, mk)]
    if diffs:
        raise GatewayError(f"checkpoint {checkpoint} does not match the plan's model {model.name}: "
                           + ", ".join(diffs) + " (checkpoint vs plan)")
    return cfg, have


def load_tokenizer(checkpoint: str):
    """The checkpoint's tokenizer, or None (token-id serving) when it has none or it is broken."""
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((Path(checkpoint) / f).exists() for f in files):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except Exception as e:  # a broken tokenizer must not stop token-id serving
        log.warning("checkpoint %s: tokenizer not loaded (%s); token ids only", checkpoint, e)
        return None


def stage_id(pipeline: int, stage: int, generation: int = 0) -> str:
    """A stage's id on its node executor: ``p{pipeline}s{stage}`` for the plan the gateway started
    with; a re-plan's generation G (replan.py) uses ``g{G}p{pipeline}s{stage}``, so the shards of
    two plans can live on one node at once while routing switches from one to the other."""
    return f"p{pipeline}s{stage}" if generation == 0 else f"g{generation}p{pipeline}s{stage}"


def stage_shift_threshold(plan: Plan, stage: Stage, override: int | None = None) -> int:
    """The step tokens above which a shifted ``stage`` runs in SP mode: ``override``
    (``--shift-threshold``), else the cost model's TP/SP crossover for the stage's GPU and
    interconnect on the plan's cluster (``hexplan.costmodel.shift_threshold``, which honours
    the plan's ``assumptions.cost_params.shift_threshold``), else for a plan without a cluster section
    that parameter or DEFAULT_SHIFT_THRESHOLD (Arctic Inference's documented 256)."""
    if override is not None:
        return int(override)
    params = plan_assumptions(plan).params
    try:
        cluster = plan_cluster(plan)
        node = cluster.node(stage.node)
    except (SpecError, KeyError, ValueError):
        if params.shift_threshold is not None:
            return int(params.shift_threshold)
        return DEFAULT_SHIFT_THRESHOLD
    return costmodel.shift_threshold(plan.model, node.gpu, stage.tp, stage.shift_sp, node.interconnect, params)


def load_shards(plan: Plan, checkpoint: str, dtype: str, node_addresses: dict, stub, max_step_tokens: int = 0,
                calibrate: tuple | None = None, timings: dict | None = None, pipelines=None,
                generation: int = 0, shift_threshold: int | None = None) -> dict:
    """Ask every node executor to load its stages; returns {(pipeline, stage): worker address}.
    ``stub(address)`` gives a node's Stage stub. Pipelines load in parallel, each one's stages
    last to first (``load_pipeline``): a stage's downstream is fixed when it is loaded.
    ``calibrate``: (batch sizes, context tokens) each stage times decode steps of after loading;
    ``timings`` (a dict) then receives {(pipeline, stage): {batch: ms}}. ``pipelines``: load only
    these (indices; default all); ``generation``: the stage ids' (``stage_id``). ``shift_threshold``:
    shifted stages' SP-mode threshold (``stage_shift_threshold``; None: each stage's default)."""
    todo = list(range(len(plan.pipelines))) if pipelines is None else list(pipelines)
    missing = sorted({s.node for pi in todo for s in plan.pipelines[pi].stages} - set(node_addresses))
    if missing:
        raise GatewayError(f"no address for node(s) {', '.join(missing)}: give them in the plan's cluster "
                           "section or with --nodes NAME=HOST:PORT")
    with futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
        jobs = [pool.submit(load_pipeline, plan, pi, checkpoint, dtype, node_addresses, stub, max_step_tokens,
                            calibrate, timings, generation, shift_threshold=shift_threshold) for pi in todo]
        addresses: dict = {}
        for pi, job in zip(todo, jobs):
            for si, address in enumerate(job.result()):
                addresses[pi, si] = address
    return addresses


def load_pipeline(plan: Plan, pi: int, checkpoint: str, dtype: str, node_addresses: dict, stub,
                  max_step_tokens: int = 0, calibrate: tuple | None = None, timings: dict | None = None,
                  generation: int = 0, shift_threshold: int | None = None) -> list[str]:
    """Load pipeline ``pi``'s stages last to first, each with the rank-0 addresses of the
    stages after it (``LoadShardRequest.downstream``: where its Forward and Release go, for
    the stage's life); returns the stages' worker addresses, first to last. Reloading any
    stage of a pipeline means reloading the stages before it too (their downstream changes)."""
    p = plan.pipelines[pi]
    model_json = json.dumps(plan.model.to_dict())
    path = str(Path(checkpoint).resolve())
    later: list[str] = []
    for si in reversed(range(len(p.stages))):
        s = p.stages[si]
        req = pb.LoadShardRequest(stage_id=stage_id(pi, si, generation), checkpoint=path, layer_start=s.layers[0],
                                  layer_end=s.layers[1], is_first=si == 0, is_last=si == len(p.stages) - 1,
                                  tp=s.tp, gpus=list(s.gpus), dtype=dtype, model_json=model_json, downstream=later,
                                  max_step_tokens=max_step_tokens)
        if s.shifted:
            problem = shift_problem(plan.model.num_heads, plan.model.num_kv_heads, plan.model.intermediate_size,
                                    s.tp, s.shift_sp)
            if problem:
                raise GatewayError(f"pipeline {pi} stage {si} on {s.node}: {problem}")
            req.shift_sp = s.shift_sp
            req.shift_threshold = stage_shift_threshold(plan, s, shift_threshold)
        if calibrate:
            req.calibrate_batches.extend(calibrate[0])
            req.calibrate_context = calibrate[1]
        try:
            resp = stub(node_addresses[s.node]).LoadShard(req, timeout=LOAD_TIMEOUT_S)
        except grpc.RpcError as e:
            raise GatewayError(f"node {s.node} ({node_addresses[s.node]}): {e.details() or e.code().name}") from None
        address = resp.address
        if timings is not None and calibrate:
            timings[pi, si] = {int(d.batch): float(d.ms) for d in resp.decode}
        later = [address] + later
    return later
