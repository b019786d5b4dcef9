"""Plans: pipelines of TP stages with layer ranges, routing weights and predictions.

A plan file is YAML (or JSON) and self-contained: it embeds the model's shape (unless it is a
built-in model), the workload it was optimised for, the solver's report and, in its ``cluster``
section, a cluster spec (docs/cluster-format.md) of the nodes it uses: GPU types, counts,
regions, interconnects, executor addresses, the coordinator, the network rules between them and
any custom GPU types, so ``hexplan simulate PLAN`` can rebuild the cluster (plan_cluster). Plans
from before that record only the nodes' names, GPUs, counts and addresses. This module is the
only place plans enter or leave as text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import yaml

from .cluster import Cluster, cluster_from_dict
from .errors import SpecError
from .models import BUILTIN_MODELS, ModelSpec, load_model, model_from_dict
from .yamlio import Locator, load_document, loads_document


@dataclass(frozen=True)
class Stage:
    node: str
    gpus: tuple[int, ...]
    tp: int
    layers: tuple[int, int]  # half-open [start, end)
    gpu: str = ""            # GPU type name, for readers
    shift_sp: int = 1        # Shift Parallelism: >1 runs large steps as sp groups of tp // sp ranks

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def shifted(self) -> bool:
        return self.shift_sp > 1


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    weight: float = 0.0                  # share of requests routed here
    throughput_tokens_per_s: float | None = None
    decode_ms_per_token: float | None = None
    ttft_ms: float | None = None


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    pipelines: tuple[Pipeline, ...]
    predicted: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    assumptions: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)   # a cluster spec of the nodes used (cluster_to_dict)

    @property
    def throughput(self) -> float:
        return float(self.predicted.get("throughput_tokens_per_s") or 0.0)

    @property
    def num_gpus(self) -> int:
        return sum(len(s.gpus) for p in self.pipelines for s in p.stages)

    # ---- text IO --------------------------------------------------------------------
    def to_dict(self) -> dict:
        model = self.model.name if BUILTIN_MODELS.get(self.model.name) == self.model else self.model.to_dict()
        d: dict = {"model": model, "pipelines": []}
        for p in self.pipelines:
            pd: dict = {"weight": _r(p.weight)}
            for k in ("throughput_tokens_per_s", "decode_ms_per_token", "ttft_ms"):
                v = getattr(p, k)
                if v is not None:
                    pd[k] = _r(v)
            pd["stages"] = [{"node": s.node, **({"gpu": s.gpu} if s.gpu else {}), "gpus": list(s.gpus),
                             "tp": s.tp, "layers": [s.layers[0], s.layers[1]],
                             **({"shift": {"sp": s.shift_sp}} if s.shifted else {})} for s in p.stages]
            d["pipelines"].append(pd)
        if self.predicted:
            d["predicted"] = {k: _r(v) for k, v in self.predicted.items()}
        if self.solver:
            d["solver"] = {k: _r(v) for k, v in self.solver.items()}
        if self.assumptions:
            d["assumptions"] = self.assumptions
        if self.cluster:
            d["cluster"] = self.cluster
        return d

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_FlowStagesDumper, sort_keys=False, width=120)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def dump(self, fmt: str = "yaml") -> str:
        return self.to_json() if fmt == "json" else self.to_yaml()

    def with_pipelines(self, pipelines) -> "Plan":
        return replace(self, pipelines=tuple(pipelines))

    # ---- display: the table `hexplan show` prints, in a terminal or a notebook -------------
    def __str__(self) -> str:
        from .render import format_plan   # lazily: rendering is not needed to read or write plans

        return format_plan(self)

    def __repr__(self) -> str:
        """One line; the dataclass repr of a real plan runs to pages (``str()`` gives the table)."""
        n = len(self.pipelines)
        tput = f", {self.throughput:,.1f} tokens/s predicted" if self.throughput else ""
        return f"<Plan {self.model.name}: {n} pipeline{'s' if n != 1 else ''}, {self.num_gpus} GPUs{tput}>"

    def _repr_html_(self) -> str:
        """Jupyter shows the table, in a fixed-width font so its columns line up."""
        import html

        return f"<pre>{html.escape(str(self))}</pre>"


def _r(v):
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


class _FlowStagesDumper(yaml.SafeDumper):
    """Writes each stage (and short lists) on one line, like the examples in the README."""


def _repr_dict(dumper, data):
    stage = "node" in data and "layers" in data
    node = "name" in data and "gpu" in data and "count" in data
    link = "bandwidth" in data and "latency" in data
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=stage or node or link)


def _repr_list(dumper, data):
    flow = all(isinstance(x, (int, float, str)) for x in data) and len(data) <= 16
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowStagesDumper.add_representer(dict, _repr_dict)
_FlowStagesDumper.add_representer(list, _repr_list)


# ---------------------------------------------------------------------------------------

def load_plan(path) -> Plan:
    data, lines = load_document(path)
    return plan_from_dict(data, Locator(str(path), lines))


def loads_plan(text: str, file: str | None = None) -> Plan:
    data, lines = loads_document(text, file=file)
    return plan_from_dict(data, Locator(file, lines))


def _int(v, path, loc, what, minimum=0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise loc.error(path, f"{what} must be an integer >= {minimum}, got {v!r}")
    return v


def plan_from_dict(data, loc: Locator | None = None) -> Plan:
    """Parse a plan. Only ``model`` and ``pipelines`` are required (hand-written plans)."""
    loc = loc or Locator(None, {})
    if not isinstance(data, dict):
        raise loc.error((), "a plan must be a mapping with 'model' and 'pipelines'")
    if "model" not in data:
        raise loc.error(("model",), "missing model")
    m = data["model"]
    try:
        model = model_from_dict(m, file=loc.file) if isinstance(m, dict) else load_model(m)
    except SpecError as e:
        raise e.located(loc.file, loc.line(("model",))) from None
    pls = data.get("pipelines")
    if not isinstance(pls, list) or not pls:
        raise loc.error(("pipelines",), "missing or empty: a plan needs at least one pipeline")
    pipelines = []
    for i, pd in enumerate(pls):
        pp = ("pipelines", i)
        if not isinstance(pd, dict):
            raise loc.error(pp, "each pipeline must be a mapping with 'stages'")
        weight = pd.get("weight", 1.0 / len(pls))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise loc.error(pp + ("weight",), f"must be a non-negative number, got {weight!r}")
        stages_raw = pd.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise loc.error(pp + ("stages",), "missing or empty list of stages")
        stages = []
        for j, sd in enumerate(stages_raw):
            sp = pp + ("stages", j)
            if not isinstance(sd, dict):
                raise loc.error(sp, "each stage must be a mapping {node, gpus, tp, layers}")
            node = sd.get("node")
            if not isinstance(node, str) or not node:
                raise loc.error(sp + ("node",), "missing node name")
            gpus = sd.get("gpus")
            if not isinstance(gpus, list) or not gpus:
                raise loc.error(sp + ("gpus",), "expected a non-empty list of GPU indices")
            gpus_t = tuple(_int(g, sp + ("gpus",), loc, "GPU index") for g in gpus)
            tp = _int(sd.get("tp", len(gpus_t)), sp + ("tp",), loc, "tp", 1)
            layers = sd.get("layers")
            if not isinstance(layers, list) or len(layers) != 2:
                raise loc.error(sp + ("layers",), "expected [start, end) like [0, 40]")
            a = _int(layers[0], sp + ("layers",), loc, "layer start")
            b = _int(layers[1], sp + ("layers",), loc, "layer end")
            gpu = sd.get("gpu", "")
            shift_sp = 1
            if sd.get("shift") is not None:
                sh = sd["shift"]
                if not isinstance(sh, dict) or set(sh) - {"sp"} or "sp" not in sh:
                    raise loc.error(sp + ("shift",), "expected a mapping {sp: N}, like shift: {sp: 2}")
                shift_sp = _int(sh["sp"], sp + ("shift", "sp"), loc, "shift sp", 1)
                if tp % shift_sp:
                    raise loc.error(sp + ("shift", "sp"), f"sp {shift_sp} must divide the stage's tp {tp}")
            stages.append(Stage(node, gpus_t, tp, (a, b), gpu if isinstance(gpu, str) else "", shift_sp))
        pipelines.append(Pipeline(tuple(stages), float(weight), _opt(pd, "throughput_tokens_per_s"),
                                  _opt(pd, "decode_ms_per_token"), _opt(pd, "ttft_ms")))
    def mapping(key):
        v = data.get(key) or {}
        if not isinstance(v, dict):
            raise loc.error((key,), "expected a mapping")
        return v
    for k, v in mapping("predicted").items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise loc.error(("predicted", k), f"must be a number, got {v!r}")
    for i, pd in enumerate(pls):
        for k in ("throughput_tokens_per_s", "decode_ms_per_token", "ttft_ms"):
            v = pd.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise loc.error(("pipelines", i, k), f"must be a number, got {v!r}")
    _check_cluster_section(mapping("cluster"), loc)
    return Plan(model, tuple(pipelines), mapping("predicted"), mapping("solver"),
                mapping("assumptions"), mapping("cluster"))


def plan_cluster(plan: Plan) -> Cluster:
    """The cluster of the nodes ``plan`` uses, rebuilt from its ``cluster`` section.

    It gives the same links, GPU figures and coordinator as the cluster the plan was made for,
    hence the same simulated numbers. Plans written before the section recorded the network
    raise SpecError naming the missing field: they need the cluster file.
    """
    section = plan.cluster or {}
    if not section.get("nodes"):
        raise SpecError("not recorded in this plan, so its cluster cannot be rebuilt", field="cluster.nodes")
    if "network" not in section:
        raise SpecError("not recorded in this plan (written before plans recorded the network between their "
                        "nodes), so its cluster cannot be rebuilt", field="cluster.network")
    return cluster_from_dict(section, Locator(None, {}).within(("cluster",)))


def _check_cluster_section(section: dict, loc: Locator) -> None:
    """A section that records the network is a cluster spec: check it as one, naming the plan's
    file and line. Older sections (name, coordinator and nodes only) are kept as they are."""
    if "network" in section:
        cluster_from_dict(section, loc.within(("cluster",)))


def _opt(d, key):
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
