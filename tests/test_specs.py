"""Cluster and model specs: units, the example cluster files, link rules, GPU catalog, models,
HF config.json loading and measured GPU profiles."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import hexplan
from hexplan import SpecError, load_cluster, load_model, loads_cluster
from hexplan.cluster import INTRA_NODE_LATENCY
from hexplan.costmodel import decode_layer_time, prefill_layer_time
from hexplan.gpus import CATALOG
from hexplan.models import BUILTIN_MODELS, model_from_dict
from hexplan.units import UnitError, parse_bandwidth, parse_size, parse_time

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "cluster_specs"


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel)


# ---- units ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("24GB", 24e9),
    ("16GiB", 16 * 2 ** 30),
    ("512MB", 512e6),
    ("1.5 GB", 1.5e9),
    ("2TB", 2e12),
    ("1TiB", 2 ** 40),
    ("64KiB", 64 * 1024),
    ("100B", 100),
    (" 8gb ", 8e9),
    ("1e3MB", 1e9),
])
def test_parse_size(text, expected):
    assert close(parse_size(text), expected)


@pytest.mark.parametrize("text, expected", [
    ("10Gbps", 10e9 / 8),
    ("100Mbps", 100e6 / 8),
    ("1Tbps", 1e12 / 8),
    ("10 gbps", 10e9 / 8),
    ("600GB/s", 600e9),
    ("25GiB/s", 25 * 2 ** 30),
    ("10GBps", 10e9),          # capital B before "ps": bytes
    ("10Gb/s", 10e9 / 8),      # lower-case b before "/s": bits
    ("500MB/s", 500e6),
])
def test_parse_bandwidth(text, expected):
    assert close(parse_bandwidth(text), expected)


def test_bits_versus_bytes():
    assert close(parse_bandwidth("8Gbps"), parse_bandwidth("1GB/s"))
    assert close(parse_bandwidth("10GB/s") / parse_bandwidth("10Gbps"), 8.0)
    assert close(parse_bandwidth("10Gb/s"), parse_bandwidth("10Gbps"))
    assert close(parse_bandwidth("10GBps"), parse_bandwidth("10GB/s"))


@pytest.mark.parametrize("text, expected", [
    ("0.5ms", 5e-4),
    ("40ms", 0.04),
    ("200us", 2e-4),
    ("5µs", 5e-6),
    ("1s", 1.0),
    ("10ns", 1e-8),
    ("0ms", 0.0),
])
def test_parse_time(text, expected):
    assert close(parse_time(text), expected)


def test_ms_and_us_are_different():
    assert close(parse_time("1ms") / parse_time("1us"), 1000.0)


@pytest.mark.parametrize("parser, value, fragment", [
    (parse_size, "24", "cannot parse"),
    (parse_size, 24, "has no unit"),
    (parse_size, "24 XB", "unknown unit 'XB'"),
    (parse_size, "GB", "cannot parse"),
    (parse_size, True, "expected a size"),
    (parse_size, None, "expected a size"),
    (parse_bandwidth, "10 parsecs", "unknown unit 'parsecs'"),
    (parse_bandwidth, "1e400Gbps", "not a finite"),
    (parse_bandwidth, 10, "has no unit"),
    (parse_bandwidth, "10Gib/s", "unknown unit"),
    (parse_time, "3 fortnights", "unknown unit 'fortnights'"),
    (parse_time, [1], "expected a duration"),
])
def test_unit_errors(parser, value, fragment):
    with pytest.raises(UnitError) as ei:
        parser(value)
    assert fragment in str(ei.value)


def test_negative_quantities_parse_so_callers_can_say_must_be_positive():
    assert parse_bandwidth("-10Gbps") < 0
    with pytest.raises(SpecError, match=r"network\.default\.bandwidth: must be positive, got '-10Gbps'"):
        loads_cluster("nodes: [{name: n0, gpu: T4, count: 1}]\n"
                      "network: {default: {bandwidth: -10Gbps, latency: 1ms}}\n")


# ---- the example cluster files ------------------------------------------------------------

def test_hexgen_case_loads():
    c = load_cluster(SPECS / "hexgen-case.yaml")
    assert c.name == "hexgen-case"
    assert [n.name for n in c.nodes] == ["n0", "n1", "n2"]
    assert [(n.gpu.name, n.count) for n in c.nodes] == [("A6000", 4), ("A5000", 2), ("A4000", 2)]
    assert c.total_gpus == 8
    assert close(c.total_memory, (4 * 48 + 2 * 24 + 2 * 16) * 1e9)
    # n0-n1 has its own rule; n0-n2 and n1-n2 use the default.
    assert close(c.link("n0", "n1").bandwidth, 25e9 / 8) and close(c.link("n0", "n1").latency, 0.2e-3)
    assert close(c.link("n1", "n0").bandwidth, 25e9 / 8)
    assert close(c.link("n0", "n2").bandwidth, 10e9 / 8) and close(c.link("n0", "n2").latency, 0.5e-3)
    assert close(c.link("n2", "n1").bandwidth, 10e9 / 8)
    # No interconnect given: the catalog's figure for the part.
    assert close(c.node("n0").interconnect, CATALOG["A6000"].interconnect)
    assert c.coordinator_node.name == "n0"
    assert c.source and c.source.endswith("hexgen-case.yaml")


def test_two_regions_loads_with_custom_gpu_and_interconnect_override():
    c = load_cluster(str(SPECS / "two-regions.yaml"))
    assert c.name == "two-regions"
    assert len(c.nodes) == 3
    assert [(n.name, n.gpu.name, n.count, n.region) for n in c.nodes] == [
        ("a", "A100-80G", 8, "us-east"), ("b", "MyGPU", 2, "eu-west"), ("c", "L4", 1, "eu-west")]
    assert c.total_gpus == 11
    assert c.regions == ["us-east", "eu-west"]
    my = c.node("b").gpu
    assert my.name == "MyGPU" and "MyGPU" not in CATALOG
    assert close(my.memory, 24e9)
    assert close(my.memory_bandwidth, 936e9)
    assert my.fp16_tflops == 71
    assert close(my.flops, 71e12)
    assert my.price_per_hour == pytest.approx(0.4)
    assert close(my.interconnect, 32e9)      # custom types default to a PCIe 4.0 x16 slot
    # Node a overrides the A100's NVLink figure; the GPU type itself is unchanged.
    a = c.node("a")
    assert close(a.interconnect, 600e9)
    assert close(a.gpu.interconnect, CATALOG["A100-80G"].interconnect)
    assert a.gpu == CATALOG["A100-80G"]
    assert close(c.link("a", "a").bandwidth, 600e9)
    assert c.link("a", "a").latency == INTRA_NODE_LATENCY
    # The WAN rule joins the two regions; inside eu-west the default applies.
    for x, y in (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")):
        assert close(c.link(x, y).bandwidth, 100e6 / 8) and close(c.link(x, y).latency, 0.04)
    assert close(c.link("b", "c").bandwidth, 10e9 / 8) and close(c.link("b", "c").latency, 1e-3)
    assert close(c.total_memory, 8 * 80e9 + 2 * 24e9 + 24e9)
    assert c.price_per_hour == pytest.approx(8 * 1.80 + 2 * 0.4 + 0.70)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_cluster_spec_loads(path):
    c = load_cluster(path)
    assert c.nodes and all(n.count > 0 for n in c.nodes)
    for a in c.nodes:
        for b in c.nodes:
            link = c.link(a.name, b.name)
            assert link.bandwidth > 0 and link.latency >= 0


def test_loads_cluster_equals_load_cluster():
    text = (SPECS / "two-regions.yaml").read_text()
    assert loads_cluster(text) == load_cluster(SPECS / "two-regions.yaml")


# ---- link resolution ------------------------------------------------------------------------

LINKS = """\
nodes:
  - {name: n0, gpu: A100-80G, count: 2, region: r1, interconnect: 123GB/s}
  - {name: n1, gpu: A100-80G, count: 2, region: r1}
  - {name: n2, gpu: L4, count: 1, region: r2}
  - {name: n3, gpu: L4, count: 1, region: r2}
  - {name: n4, gpu: T4, count: 1}
network:
  default: {bandwidth: 1Gbps, latency: 9ms}
  links:
    - {between: [n0, n2], bandwidth: 4Gbps, latency: 4ms}     # node-node, listed first
    - {between: [n0, r2], bandwidth: 3Gbps, latency: 3ms}     # node-region
    - {between: [r1, r2], bandwidth: 2Gbps, latency: 2ms}     # region-region, listed last
    - {between: [r1, r1], bandwidth: 5Gbps, latency: 5ms}     # inside region r1
    - {between: [n1, r1], bandwidth: 6Gbps, latency: 6ms}     # node-region inside r1
"""


def _gbps(link):
    return round(link.bandwidth * 8 / 1e9, 9)


def test_link_specificity_beats_order():
    c = loads_cluster(LINKS)
    assert _gbps(c.link("n0", "n2")) == 4           # node-node beats everything
    assert _gbps(c.link("n2", "n0")) == 4           # and works in both directions
    assert _gbps(c.link("n0", "n3")) == 3           # node-region beats region-region
    assert _gbps(c.link("n3", "n0")) == 3
    assert _gbps(c.link("n1", "n2")) == 2           # region-region beats the default
    assert _gbps(c.link("n1", "n3")) == 2
    assert _gbps(c.link("n2", "n3")) == 1           # no rule for r2-r2: the default
    assert c.link("n2", "n3").latency == pytest.approx(9e-3)
    assert _gbps(c.link("n0", "n1")) == 6           # node-region [n1, r1] beats region-region [r1, r1]
    assert _gbps(c.link("n4", "n0")) == 1           # n4 has no region: only the default
    assert _gbps(c.link("n4", "n2")) == 1


def test_same_node_uses_its_interconnect():
    c = loads_cluster(LINKS)
    assert c.link("n0", "n0").bandwidth == pytest.approx(123e9)
    assert c.link("n0", "n0").latency == INTRA_NODE_LATENCY
    assert c.link("n2", "n2").bandwidth == pytest.approx(CATALOG["L4"].interconnect)
    assert c.link("n1", "n1").bandwidth == pytest.approx(CATALOG["A100-80G"].interconnect)


def test_equally_specific_rules_last_one_wins():
    c = loads_cluster("""\
nodes:
  - {name: a, gpu: T4, count: 1, region: x}
  - {name: b, gpu: T4, count: 1, region: y}
network:
  links:
    - {between: [a, b], bandwidth: 1Gbps, latency: 1ms}
    - {between: [b, a], bandwidth: 2Gbps, latency: 1ms}
    - {between: [x, y], bandwidth: 7Gbps, latency: 1ms}
    - {between: [y, x], bandwidth: 8Gbps, latency: 1ms}
""")
    assert _gbps(c.link("a", "b")) == 2
    assert _gbps(c.link("b", "a")) == 2
    c2 = loads_cluster("""\
nodes:
  - {name: a, gpu: T4, count: 1, region: x}
  - {name: b, gpu: T4, count: 1, region: y}
network:
  links:
    - {between: [x, y], bandwidth: 7Gbps, latency: 1ms}
    - {between: [y, x], bandwidth: 8Gbps, latency: 1ms}
""")
    assert _gbps(c2.link("a", "b")) == 8
    c3 = loads_cluster("""\
nodes:
  - {name: a, gpu: T4, count: 1, region: x}
  - {name: b, gpu: T4, count: 1, region: y}
network:
  links:
    - {between: [y, x], bandwidth: 8Gbps, latency: 1ms}
    - {between: [x, y], bandwidth: 7Gbps, latency: 1ms}
""")
    assert _gbps(c3.link("a", "b")) == 7


def test_default_network_when_none_given():
    c = loads_cluster("nodes: [{name: a, gpu: T4, count: 1}, {name: b, gpu: T4, count: 1}]\n")
    assert _gbps(c.link("a", "b")) == 10
    assert c.link("a", "b").latency == pytest.approx(1e-3)


def test_a_node_and_a_region_with_one_name_are_rejected():
    with pytest.raises(SpecError, match="'r1' is both a node name and a region name"):
        loads_cluster("nodes: [{name: r1, gpu: T4, count: 1, region: r1}]\n")


def test_a_link_from_a_node_to_itself_is_rejected():
    with pytest.raises(SpecError, match=r"network\.links\[0\]\.between: a link joins two different nodes"):
        loads_cluster("nodes: [{name: a, gpu: T4, count: 1}]\n"
                      "network: {links: [{between: [a, a], bandwidth: 1Gbps, latency: 1ms}]}\n")


# ---- coordinator ----------------------------------------------------------------------------

def test_coordinator_defaults_to_first_node():
    c = loads_cluster("nodes: [{name: z, gpu: T4, count: 1}, {name: a, gpu: L4, count: 1}]\n")
    assert c.coordinator == ""
    assert c.coordinator_node.name == "z"


def test_explicit_coordinator():
    c = loads_cluster("coordinator: a\nnodes: [{name: z, gpu: T4, count: 1}, {name: a, gpu: L4, count: 1}]\n")
    assert c.coordinator_node.name == "a"
    with pytest.raises(SpecError, match=r"coordinator: unknown node 'q'; nodes: a, z"):
        loads_cluster("coordinator: q\nnodes: [{name: z, gpu: T4, count: 1}, {name: a, gpu: L4, count: 1}]\n")


# ---- GPU catalog ------------------------------------------------------------------------------

EXPECTED_GPUS = ["H100-80G", "H200", "A100-80G", "A100-40G", "L40S", "L4", "A10G", "T4", "V100-16G",
                 "V100-32G", "A6000", "A5000", "A4000", "RTX3090", "RTX4090", "cpu"]


def test_hexplan_gpus_lists_the_catalog():
    r = subprocess.run([sys.executable, "-m", "hexplan.cli", "gpus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()[2:] if line.strip()]
    for g in EXPECTED_GPUS:
        assert g in names, g
    # Memory column matches the catalog: e.g. "80 GB" for the H100 and "141 GB" for the H200.
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert " 80 GB " in rows["H100-80G"] and " 141 GB " in rows["H200"] and " 16 GB " in rows["T4"]


def test_catalog_figures_are_sane():
    for g in EXPECTED_GPUS:
        gpu = CATALOG[g]
        assert gpu.memory > 0 and gpu.memory_bandwidth > 0 and gpu.fp16_tflops > 0 and gpu.interconnect > 0
    assert CATALOG["A100-40G"].memory == 40e9 and CATALOG["A100-80G"].memory == 80e9
    assert CATALOG["V100-16G"].memory == 16e9 and CATALOG["V100-32G"].memory == 32e9
    assert CATALOG["H200"].memory > CATALOG["H100-80G"].memory


def test_a_builtin_type_can_be_partly_overridden():
    c = loads_cluster("gpu_types: {T4: {memory: 15GB}}\nnodes: [{name: a, gpu: T4, count: 1}]\n")
    g = c.node("a").gpu
    assert g.memory == 15e9
    assert g.memory_bandwidth == CATALOG["T4"].memory_bandwidth
    assert g.fp16_tflops == CATALOG["T4"].fp16_tflops
    assert CATALOG["T4"].memory == 16e9   # the catalog itself is untouched


def test_custom_gpu_type_needs_its_figures():
    with pytest.raises(SpecError, match=r"gpu_types\.X\.memory_bandwidth: missing memory bandwidth"):
        loads_cluster("gpu_types: {X: {memory: 24GB, fp16_tflops: 10}}\nnodes: [{name: a, gpu: X, count: 1}]\n")
    with pytest.raises(SpecError, match=r"gpu_types\.X\.fp16_tflops: missing fp16_tflops"):
        loads_cluster("gpu_types: {X: {memory: 24GB, memory_bandwidth: 1TB/s}}\n"
                      "nodes: [{name: a, gpu: X, count: 1}]\n")


# ---- models -----------------------------------------------------------------------------------

BUILTINS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-30b", "llama-3-8b", "llama-3-70b",
            "mistral-7b", "qwen2.5-72b"]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_models(name):
    m = load_model(name)
    assert m is BUILTIN_MODELS[name] and m.name == name
    assert m.num_heads % m.num_kv_heads == 0
    assert m.tp_degree_ok(1) is None
    assert m.layer_bytes == m.params_per_layer * m.bytes_per_param


@pytest.mark.parametrize("name, low, high", [
    ("llama-2-7b", 6.6e9, 6.8e9),
    ("llama-2-13b", 12.9e9, 13.1e9),
    ("llama-2-70b", 68e9, 70e9),
    ("llama-30b", 32.3e9, 32.7e9),
    ("llama-3-8b", 7.9e9, 8.1e9),
    ("llama-3-70b", 70.4e9, 70.8e9),
    ("mistral-7b", 7.1e9, 7.3e9),
    ("qwen2.5-72b", 72.5e9, 72.9e9),
])
def test_parameter_counts(name, low, high):
    assert low <= BUILTIN_MODELS[name].total_params <= high


def test_gqa_shapes():
    m70 = BUILTIN_MODELS["llama-2-70b"]
    assert (m70.num_heads, m70.num_kv_heads, m70.dim_head) == (64, 8, 128)
    assert m70.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    m7 = BUILTIN_MODELS["llama-2-7b"]
    assert m7.kv_bytes_per_token_per_layer == 2 * 32 * 128 * 2
    assert m70.tp_degree_ok(8) is None and m70.tp_degree_ok(16) is None   # 8 KV heads replicated over 16
    assert "not divisible by TP 3" in m70.tp_degree_ok(3)
    assert "52 attention heads are not divisible by TP 8" == BUILTIN_MODELS["llama-30b"].tp_degree_ok(8)


def test_unknown_model_names_the_builtins():
    with pytest.raises(SpecError) as ei:
        load_model("llama-9000")
    msg = str(ei.value)
    assert msg.startswith("model: unknown model 'llama-9000'")
    for name in BUILTINS:
        assert name in msg


MISTRAL_LIKE = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


def test_hf_config_json_with_gqa(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MISTRAL_LIKE))
    for arg in (str(d), str(d / "config.json")):
        m = load_model(arg)
        assert m.name == "my-model"
        assert (m.num_layers, m.hidden_size, m.intermediate_size) == (32, 4096, 14336)
        assert (m.num_heads, m.num_kv_heads, m.dim_head) == (32, 8, 128)
        assert m.dtype == "bfloat16" and m.bytes_per_param == 2
        assert m.model_type == "mistral" and m.rope_theta == 1e6 and m.max_position_embeddings == 32768
        assert m.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
        # Same shapes as the built-in mistral-7b, so the same parameter count.
        assert m.total_params == BUILTIN_MODELS["mistral-7b"].total_params
    other = tmp_path / "tiny.json"
    cfg = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_hidden_layers": 2,
           "vocab_size": 1000}
    other.write_text(json.dumps(cfg))
    m = load_model(str(other))
    assert m.name == "tiny"
    assert m.num_kv_heads == 8           # no num_key_value_heads: plain multi-head attention
    assert m.dtype == "float16" and m.model_type == "llama"
    assert m.params_per_layer == 4 * 256 * 256 + 3 * 256 * 512 + 2 * 256


def test_hf_config_qwen2_has_qkv_bias(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64,
           "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 152064, "torch_dtype": "bfloat16",
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    m = load_model(str(p))
    assert m.attention_bias is True
    assert m.total_params == BUILTIN_MODELS["qwen2.5-72b"].total_params


@pytest.mark.parametrize("patch, fragment", [
    ({"model_type": "gpt2"}, "model_type: unsupported model type 'gpt2'"),
    ({"num_attention_heads": 0}, "num_attention_heads: must be a positive integer, got 0"),
    ({"num_key_value_heads": 5}, "num_key_value_heads: 5 does not divide num_attention_heads 32"),
    ({"hidden_size": "4096"}, "hidden_size: must be a positive integer, got '4096'"),
    ({"torch_dtype": "int3"}, "torch_dtype: unsupported dtype 'int3'"),
    ({"torch_dtype": ["float16"]}, "torch_dtype: unsupported dtype"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps: must be a positive number, got 'small'"),
    ({"rope_theta": [1]}, "rope_theta: must be a positive number"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings: must be true or false, got 'no'"),
    ({"head_dim": True}, "head_dim: must be a positive integer, got True"),
])
def test_bad_hf_config(tmp_path, patch, fragment):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**MISTRAL_LIKE, **patch}))
    with pytest.raises(SpecError) as ei:
        load_model(str(p))
    assert str(ei.value).startswith(str(p) + ": ")
    assert fragment in str(ei.value)


def test_hf_config_not_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 4096,\n  oops}')
    with pytest.raises(SpecError, match=r"config\.json:2: not valid JSON"):
        load_model(str(p))
    with pytest.raises(SpecError, match="file not found"):
        load_model(str(tmp_path / "missing.json"))


def test_read_hf_config(tmp_path):
    # The one reader of config.json (the executor's gateway and stage model use it too).
    from hexplan.models import read_hf_config
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MISTRAL_LIKE))
    assert read_hf_config(d) == read_hf_config(d / "config.json") == MISTRAL_LIKE
    with pytest.raises(SpecError) as ei:
        read_hf_config(tmp_path / "empty")
    assert str(ei.value) == f"{tmp_path / 'empty'}: file not found"
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(SpecError) as ei:
        read_hf_config(d)
    assert str(ei.value) == f"{d / 'config.json'}: must hold a JSON object, got [1, 2]"
    (d / "config.json").write_text('{"hidden_size": 64,\n  oops}')
    with pytest.raises(SpecError, match=r"config\.json:2: not valid JSON"):
        read_hf_config(d)


def test_hf_config_as_transformers_5_writes_it(tmp_path):
    # transformers >= 5 keeps rope_theta inside rope_parameters; keys left out (or null) take
    # transformers' defaults: rms_norm_eps 1e-6, num_key_value_heads = num_attention_heads.
    cfg = {k: v for k, v in MISTRAL_LIKE.items() if k not in ("rope_theta", "rms_norm_eps")}
    cfg.update(num_key_value_heads=None, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    m = load_model(str(p))
    assert (m.rope_theta, m.rms_norm_eps, m.num_kv_heads) == (500000.0, 1e-6, 32)
    p.write_text(json.dumps({**cfg, "rope_parameters": {"rope_theta": "big"}}))
    with pytest.raises(SpecError, match=r"config\.json: rope_parameters\.rope_theta: must be a positive number"):
        load_model(str(p))
    p.write_text(json.dumps({**cfg, "rope_parameters": [500000.0]}))
    with pytest.raises(SpecError, match=r"config\.json: rope_parameters: must be a JSON object"):
        load_model(str(p))


def test_model_round_trip_through_dict():
    for name in BUILTINS:
        m = BUILTIN_MODELS[name]
        assert model_from_dict(m.to_dict()) == m
    d = BUILTIN_MODELS["llama-2-7b"].to_dict()
    with pytest.raises(SpecError, match=r"model\.dtype: must be a non-empty string, got \['float16'\]"):
        model_from_dict({**d, "dtype": ["float16"]})
    with pytest.raises(SpecError, match=r"model\.rms_norm_eps: must be a positive number, got 'x'"):
        model_from_dict({**d, "rms_norm_eps": "x"})
    with pytest.raises(SpecError, match=r"model: missing field\(s\) \['num_layers'\]"):
        model_from_dict({k: v for k, v in d.items() if k != "num_layers"})


# ---- measured profiles ----------------------------------------------------------------------

PROFILED = """\
gpu_types:
  A100-40G:
    profiles:
      llama-2-70b: {decode_ms: {2: 1.4, 100: 2.5}, prefill_ms: {1000: 8}}
nodes:
  - {name: n0, gpu: A100-40G, count: 8}
"""


def test_profile_replaces_the_analytic_estimate():
    c = loads_cluster(PROFILED)
    gpu = c.node("n0").gpu
    m70, m7 = BUILTIN_MODELS["llama-2-70b"], BUILTIN_MODELS["llama-2-7b"]
    # The rest of the A100-40G figures are the catalog's.
    assert gpu.memory == CATALOG["A100-40G"].memory and gpu.fp16_tflops == CATALOG["A100-40G"].fp16_tflops
    prof = gpu.profile_for("llama-2-70b")
    assert prof is not None and gpu.profile_for("llama-2-7b") is None
    assert prof.decode_ms.points == ((2.0, 1.4), (100.0, 2.5))
    assert prof.prefill_ms.points == ((1000.0, 8.0),)
    ic = c.node("n0").interconnect
    # TP 1 has no all-reduce, so the decode time is the measured figure exactly.
    assert decode_layer_time(m70, gpu, 1, 2, 600.0, ic) == pytest.approx(1.4e-3)
    assert decode_layer_time(m70, gpu, 1, 100, 600.0, ic) == pytest.approx(2.5e-3)
    assert decode_layer_time(m70, gpu, 1, 51, 600.0, ic) == pytest.approx(1.95e-3)   # interpolated
    assert decode_layer_time(m70, gpu, 1, 1, 600.0, ic) == pytest.approx(1.4e-3)     # clamped below
    assert decode_layer_time(m70, gpu, 1, 198, 600.0, ic) == pytest.approx(3.6e-3)   # extrapolated
    # The context length does not enter a measured decode time.
    assert decode_layer_time(m70, gpu, 1, 16, 100.0, ic) == decode_layer_time(m70, gpu, 1, 16, 4000.0, ic)
    assert prefill_layer_time(m70, gpu, 1, 1000, ic) == pytest.approx(8e-3)
    assert prefill_layer_time(m70, gpu, 1, 2000, ic) == pytest.approx(16e-3)         # scaled from one point
    # The analytic estimate on the plain catalog part is a different number.
    plain = CATALOG["A100-40G"]
    analytic = decode_layer_time(m70, plain, 1, 16, 600.0, ic)
    measured = decode_layer_time(m70, gpu, 1, 16, 600.0, ic)
    assert measured == pytest.approx((1.4 + 1.1 * 14 / 98) * 1e-3)
    assert analytic != pytest.approx(measured, rel=0.01)
    # TP 2 splits the measured time and adds the all-reduces.
    tp2 = decode_layer_time(m70, gpu, 2, 16, 600.0, ic)
    assert measured / 2 < tp2 < measured
    # A model without a profile keeps the analytic estimate.
    assert decode_layer_time(m7, gpu, 1, 16, 600.0, ic) == decode_layer_time(m7, plain, 1, 16, 600.0, ic)
    assert prefill_layer_time(m7, gpu, 1, 512, ic) == prefill_layer_time(m7, plain, 1, 512, ic)


def test_profile_tables_are_checked():
    bad = PROFILED.replace("{2: 1.4, 100: 2.5}", "{2: -1.4}")
    with pytest.raises(SpecError) as ei:
        loads_cluster(bad, file="p.yaml")
    assert str(ei.value).startswith("p.yaml:4: gpu_types.A100-40G.profiles.llama-2-70b.decode_ms")
    assert "milliseconds must be positive, got -1.4" in str(ei.value)
    bad = PROFILED.replace("decode_ms:", "decode_us:")
    with pytest.raises(SpecError, match="unknown field 'decode_us'; expected one of allreduce_ms, allreduce_tp, by_tp, "
                                        "call_ms, decode_ms, lm_head_ms, prefill_ms"):
        loads_cluster(bad)
    bad = PROFILED.replace("{1000: 8}", "[8]")
    with pytest.raises(SpecError, match=r"prefill_ms: expected a mapping like \{1: 1.4, 100: 2.5\}"):
        loads_cluster(bad)


def test_solve_uses_the_profile():
    """A profile that makes A100-40G decode much slower shows up in the planned throughput."""
    fast = hexplan.solve(loads_cluster(PROFILED), model="llama-2-70b", time_limit=2, backend="none")
    slow_text = PROFILED.replace("{2: 1.4, 100: 2.5}", "{2: 14, 100: 25}").replace("{1000: 8}", "{1000: 80}")
    slow = hexplan.solve(loads_cluster(slow_text), model="llama-2-70b", time_limit=2, backend="none")
    assert slow.throughput < fast.throughput * 0.5
