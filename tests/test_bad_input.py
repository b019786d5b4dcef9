"""Bad input through the CLI: exit code 2, exactly one line on stderr, no traceback, and the
message names the file, the line and the field."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hexplan.gpus import CATALOG
from hexplan.models import BUILTIN_MODELS

ROOT = Path(__file__).resolve().parent.parent
HEXGEN = ROOT / "cluster_specs" / "hexgen-case.yaml"


def hexplan(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def one_error_line(r) -> str:
    """The run failed the documented way; return its message (without the 'hexplan: error: ' prefix)."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stderr.endswith("\n")
    assert lines[0].startswith("hexplan: error: "), lines[0]
    return lines[0][len("hexplan: error: "):]


def write(tmp_path, text, name="cluster.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def validate_error(tmp_path, text) -> tuple[str, str]:
    p = write(tmp_path, text)
    return one_error_line(hexplan("validate", p)), str(p)


# Each case: YAML text, the line and dotted field the message must name, and fragments it must hold.
CASES = {
    "yaml syntax error": (
        "name: x\nnodes:\n  - name: n0\n    gpu: T4\n   count: 1\n",
        5, None, ["YAML syntax error"]),
    "yaml syntax error, unclosed flow": (
        "name: x\nnodes: [{name: n0, gpu: T4, count: 1}\nnetwork: {}\n",
        3, None, ["YAML syntax error", "expected ',' or ']'"]),
    "yaml syntax error, mapping value": (
        "name: x\nfoo: bar: baz\nnodes: [{name: n0, gpu: T4, count: 1}]\n",
        2, None, ["YAML syntax error", "mapping values are not allowed here"]),
    "unknown gpu type": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: Z100, count: 2}\n",
        3, "nodes[1].gpu", ["unknown GPU type 'Z100'", "known: "] + list(CATALOG)),
    "missing count": (
        "nodes:\n  - name: n0\n    gpu: T4\n    count: 1\n  - name: n1\n    gpu: L4\n",
        5, "nodes[1].count", ["missing GPU count"]),
    "negative count": (
        "nodes:\n  - name: n0\n    gpu: T4\n    count: -2\n",
        4, "nodes[0].count", ["must be a positive integer, got -2"]),
    "zero count": (
        "nodes:\n  - {name: n0, gpu: T4, count: 0}\n",
        2, "nodes[0].count", ["must be a positive integer, got 0"]),
    "fractional count": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1.5}\n",
        2, "nodes[0].count", ["must be a positive integer, got 1.5"]),
    "negative link bandwidth": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: T4, count: 1}\nnetwork:\n  links:\n"
        "    - between: [n0, n1]\n      bandwidth: -10Gbps\n      latency: 1ms\n",
        7, "network.links[0].bandwidth", ["must be positive, got '-10Gbps'"]),
    "zero default bandwidth": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\nnetwork:\n  default:\n    bandwidth: 0Gbps\n    latency: 1ms\n",
        5, "network.default.bandwidth", ["must be positive, got '0Gbps'"]),
    "negative node interconnect": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: T4, count: 1, interconnect: -1GB/s}\n",
        3, "nodes[1].interconnect", ["must be positive, got '-1GB/s'"]),
    "negative latency": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\nnetwork:\n  default: {bandwidth: 1Gbps, latency: -2ms}\n",
        4, "network.default.latency", ["must be non-negative, got '-2ms'"]),
    "negative memory in a custom gpu type": (
        "gpu_types:\n  MyGPU:\n    memory: -24GB\n    memory_bandwidth: 900GB/s\n    fp16_tflops: 70\n"
        "nodes:\n  - {name: n0, gpu: MyGPU, count: 1}\n",
        3, "gpu_types.MyGPU.memory", ["must be positive, got '-24GB'"]),
    "negative tflops in a custom gpu type": (
        "gpu_types:\n  MyGPU: {memory: 24GB, memory_bandwidth: 900GB/s, fp16_tflops: -70}\n"
        "nodes:\n  - {name: n0, gpu: MyGPU, count: 1}\n",
        2, "gpu_types.MyGPU.fp16_tflops", ["fp16_tflops must be positive, got -70"]),
    "unit that does not parse": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\nnetwork:\n  default:\n    bandwidth: 10 parsecs\n"
        "    latency: 1ms\n",
        5, "network.default.bandwidth", ["unknown unit 'parsecs'", "Gbps"]),
    "memory without a unit": (
        "gpu_types:\n  MyGPU: {memory: 24, memory_bandwidth: 900GB/s, fp16_tflops: 70}\n"
        "nodes:\n  - {name: n0, gpu: MyGPU, count: 1}\n",
        2, "gpu_types.MyGPU.memory", ["24 has no unit", "'24GB'"]),
    "latency in furlongs": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\nnetwork:\n  default: {bandwidth: 1Gbps, latency: 3 furlongs}\n",
        4, "network.default.latency", ["unknown unit 'furlongs'"]),
    "duplicate node names": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: T4, count: 1}\n"
        "  - {name: n0, gpu: L4, count: 1}\n",
        4, "nodes[2].name", ["duplicate node name 'n0'"]),
    "link names an unknown node": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: T4, count: 1}\nnetwork:\n  links:\n"
        "    - {between: [n0, n1], bandwidth: 1Gbps, latency: 1ms}\n"
        "    - {between: [n0, n9], bandwidth: 1Gbps, latency: 1ms}\n",
        7, "network.links[1].between[1]", ["'n9' is neither a node nor a region", "nodes: n0, n1"]),
    "link names an unknown region": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1, region: us}\n  - {name: n1, gpu: T4, count: 1, region: eu}\n"
        "network:\n  links:\n    - {between: [asia, eu], bandwidth: 1Gbps, latency: 1ms}\n",
        6, "network.links[0].between[0]", ["'asia' is neither a node nor a region", "regions: eu, us"]),
    "duplicate yaml keys": (
        "name: a\nnodes:\n  - {name: n0, gpu: T4, count: 1}\nname: b\n",
        4, "name", ["duplicate key 'name'"]),
    "duplicate yaml keys inside a node": (
        "nodes:\n  - name: n0\n    gpu: T4\n    count: 1\n    gpu: L4\n",
        5, "nodes[0].gpu", ["duplicate key 'gpu'"]),
    "unknown field": (
        "nodes:\n  - {name: n0, gpu: T4, count: 1}\n  - {name: n1, gpu: T4, cuont: 1}\n",
        3, "nodes[1].cuont", ["unknown field 'cuont'", "count"]),
    "unknown coordinator": (
        "coordinator: n7\nnodes:\n  - {name: n0, gpu: T4, count: 1}\n",
        1, "coordinator", ["unknown node 'n7'"]),
    "no nodes": (
        "name: empty\nnodes: []\n",
        2, "nodes", ["missing or empty"]),
    "recursive alias": (
        "name: x\ndescription: &d [*d]\nnodes: [{name: n0, gpu: T4, count: 1}]\n",
        2, "description[0]", ["recursive YAML alias"]),
    "NUL character": (
        "name: x\nnodes: [{name: n0, gpu: T4, count: 1}]\ndescription: a\x00b\n",
        3, None, ["YAML syntax error", "U+0000"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_cluster_file(tmp_path, case):
    text, line, field, fragments = CASES[case]
    msg, path = validate_error(tmp_path, text)
    where = f"{path}:{line}: "
    assert msg.startswith(where), msg
    if field is not None:
        assert msg.startswith(where + field + ": "), msg
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("case", ["unknown gpu type", "duplicate node names", "yaml syntax error"])
def test_solve_reports_cluster_errors_the_same_way(tmp_path, case):
    text, line, field, fragments = CASES[case]
    p = write(tmp_path, text)
    msg = one_error_line(hexplan("solve", p, "-m", "llama-2-7b", "-q", "-o", tmp_path / "plan.yaml"))
    assert msg.startswith(f"{p}:{line}: ")
    assert fragments[0] in msg
    assert not (tmp_path / "plan.yaml").exists()


def test_missing_cluster_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = one_error_line(hexplan("validate", missing))
    assert msg == f"{missing}: file not found"
    msg = one_error_line(hexplan("solve", missing, "-m", "llama-2-7b", "-q"))
    assert msg == f"{missing}: file not found"


def test_cluster_path_is_a_directory(tmp_path):
    msg = one_error_line(hexplan("validate", tmp_path))
    assert msg == f"{tmp_path}: is a directory, expected a file"


def test_cluster_file_not_utf8(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"nodes: \xff\xfe\x00\n")
    assert one_error_line(hexplan("validate", p)) == f"{p}: not a UTF-8 text file"


def test_unknown_model():
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", "llama-9000", "-q"))
    assert msg.startswith("model: unknown model 'llama-9000'")
    for name in BUILTIN_MODELS:
        assert name in msg


def test_bad_model_config_json(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                               "num_hidden_layers": -32, "vocab_size": 32000}))
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", cfg, "-q"))
    assert msg == f"{cfg}: num_hidden_layers: must be a positive integer, got -32"
    cfg.write_text('{"hidden_size": 4096,\n "oops"\n}')
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", cfg, "-q"))
    assert msg.startswith(f"{cfg}:3: not valid JSON (Expecting ':' delimiter)")


def _needed_gb(model_name: str) -> float:
    m = BUILTIN_MODELS[model_name]
    return (m.num_layers * m.layer_bytes + m.embedding_bytes + m.head_bytes) / 1e9


def test_model_that_cannot_fit(tmp_path):
    p = write(tmp_path, "name: tiny\nnodes:\n  - {name: n0, gpu: T4, count: 1}\n")
    msg = one_error_line(hexplan("solve", p, "-m", "llama-2-70b", "-q", "-o", tmp_path / "plan.yaml"))
    assert msg.startswith(f"{p}: "), msg
    assert "llama-2-70b does not fit in cluster 'tiny'" in msg
    # How much is needed (the weights alone are 138 GB) and how much there is (one 16 GB T4).
    needed = re.search(r"needs ([0-9.]+) GB \(([0-9.]+) GB of weights", msg)
    assert needed, msg
    assert float(needed.group(2)) == pytest.approx(_needed_gb("llama-2-70b"), abs=0.05)
    assert float(needed.group(1)) >= float(needed.group(2))
    assert "of 16.0 GB on 1 GPUs" in msg
    usable = re.search(r"has ([0-9.]+) GB usable", msg)
    assert usable and 0 < float(usable.group(1)) < 16.0
    assert not (tmp_path / "plan.yaml").exists()


def test_model_that_cannot_fit_with_progress_lines(tmp_path):
    """Without -q the progress banner comes first; the error is still the one last line."""
    p = write(tmp_path, "nodes:\n  - {name: n0, gpu: T4, count: 1}\n")
    r = hexplan("solve", p, "-m", "llama-2-70b", "-o", tmp_path / "plan.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"hexplan: error: {p}: llama-2-70b does not fit")
    assert sum(line.startswith("hexplan: error:") for line in r.stderr.splitlines()) == 1


def test_slo_no_placement_can_meet(tmp_path):
    r = hexplan("solve", HEXGEN, "-m", "llama-2-70b", "--slo-tpot-ms", "1", "-q", "--time-limit", "10",
                "-o", tmp_path / "plan.yaml")
    msg = one_error_line(r)
    assert msg.startswith(f"{HEXGEN}: no placement meets the TPOT SLO of 1 ms"), msg
    best = re.search(r"the best achievable is ([0-9.]+) ms", msg)
    assert best, msg
    assert float(best.group(1)) > 1.0
    assert not (tmp_path / "plan.yaml").exists()


def test_slo_best_achievable_is_achievable(tmp_path):
    """The 'best achievable' figure is honest: asking for slightly more than it succeeds."""
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", "llama-2-7b", "--slo-tpot-ms", "1", "-q",
                                 "--time-limit", "10", "-o", tmp_path / "p.yaml"))
    best = float(re.search(r"the best achievable is ([0-9.]+) ms", msg).group(1))
    r = hexplan("solve", HEXGEN, "-m", "llama-2-7b", "--slo-tpot-ms", f"{best * 1.01:.3f}", "-q",
                "--time-limit", "10", "--solver", "none", "-o", tmp_path / "p.yaml")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--time-limit", "-1"], "time_limit: must be a positive number of seconds"),
    (["--slo-tpot-ms", "-5"], "slo_tpot_ms: must be a positive number of milliseconds"),
    (["--prompt-tokens", "0"], "--prompt-tokens: must be a positive integer, got 0"),
    (["--batch-size", "100", "--concurrency", "10"], "--concurrency: concurrency 10 is below batch_size 100"),
    (["--max-pipelines", "0"], "--max-pipelines: must be at least 1"),
])
def test_bad_solve_options(tmp_path, args, fragment):
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", "llama-2-7b", "-q", *args, "-o", tmp_path / "p.yaml"))
    assert fragment in msg, msg


def test_bad_command_line_is_one_line():
    r = hexplan("solve", HEXGEN)   # --model missing
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "hexplan solve: error: the following arguments are required: --model/-m\n"
    r = hexplan("solve", HEXGEN, "-m", "llama-2-7b", "--time-limit", "soon")
    assert r.returncode == 2
    assert r.stderr == "hexplan solve: error: argument --time-limit: invalid float value: 'soon'\n"


def test_unwritable_output(tmp_path):
    out = tmp_path / "no-such-dir" / "plan.yaml"
    msg = one_error_line(hexplan("solve", HEXGEN, "-m", "llama-2-7b", "-q", "--solver", "none",
                                 "--time-limit", "2", "-o", out))
    assert msg.startswith(f"{out}: --output: cannot write the plan"), msg


def test_validate_good_cluster():
    r = hexplan("validate", HEXGEN)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith(f"{HEXGEN}: ok: cluster 'hexgen-case', 3 nodes, 8 GPUs")
    assert "4x A6000, 2x A5000, 2x A4000" in r.stdout


def test_validate_good_cluster_with_regions():
    r = hexplan("validate", ROOT / "cluster_specs" / "two-regions.yaml")
    assert r.returncode == 0, r.stderr
    assert "11 GPUs" in r.stdout and "regions us-east, eu-west" in r.stdout


def test_hexplan_console_script_behaves_the_same(tmp_path):
    import shutil
    exe = shutil.which("hexplan")
    if exe is None:
        pytest.skip("the hexplan console script is not on PATH")
    p = write(tmp_path, "nodes:\n  - {name: n0, gpu: Z100, count: 1}\n")
    r = subprocess.run([exe, "validate", str(p)], capture_output=True, text=True, timeout=60)
    msg = one_error_line(r)
    assert msg.startswith(f"{p}:2: nodes[0].gpu: unknown GPU type 'Z100'")


# ---- a plan checked against the wrong cluster: one short line --------------------------------------

@pytest.fixture(scope="module")
def hexgen_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("wrong") / "hexgen.plan.yaml"
    r = hexplan("solve", HEXGEN, "-m", "llama-2-70b", "-q", "--time-limit", "5", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("command", ["validate", "show", "simulate"])
def test_plan_on_the_wrong_cluster_is_one_short_line(hexgen_plan, command):
    from hexplan import load_cluster, load_plan, validate_plan

    helix = ROOT / "cluster_specs" / "helix-24.yaml"
    args = {"validate": ("validate", helix, "--plan", hexgen_plan), "show": ("show", hexgen_plan, "--cluster", helix),
            "simulate": ("simulate", hexgen_plan, "--cluster", helix, "--rate", "1")}[command]
    msg = one_error_line(hexplan(*args))
    n = len(validate_plan(load_plan(hexgen_plan), load_cluster(helix)))
    assert n > 3   # every stage is on an unknown node: without the cut the line ran to ~2,000 characters
    assert msg.startswith(f"{hexgen_plan}: plan: does not match cluster 'helix-24': the plan was made for "
                          f"'hexgen-case' ({n} problems: pipeline 0 stage 0: unknown node ")
    assert msg.endswith(f"; ... and {n - 3} more)") and msg.count("unknown node") == 3
    assert len(msg) < 300 + len(str(hexgen_plan)), msg


def test_plan_that_does_not_fit_its_own_cluster(tmp_path):
    """Same cluster name, fewer GPUs: no 'made for' clause, the problems listed in full when few."""
    from hexplan import load_cluster, load_plan, loads_cluster
    from hexplan.validate import describe_problems

    small = write(tmp_path, "name: hexgen-case\nnodes:\n  - {name: n0, gpu: A6000, count: 4}\n"
                            "  - {name: n1, gpu: A5000, count: 2}\n  - {name: n2, gpu: A4000, count: 1}\n")
    plan_file = tmp_path / "p.yaml"
    assert hexplan("solve", HEXGEN, "-m", "llama-2-70b", "-q", "--time-limit", "5", "-o", plan_file).returncode == 0
    msg = one_error_line(hexplan("validate", small, "--plan", plan_file))
    assert msg == (f"{plan_file}: plan: does not fit cluster 'hexgen-case' (1 problem: pipeline 0 stage 0: "
                   "GPU index 1 outside node n2 (0..0))")
    plan = load_plan(plan_file)
    problems = [f"problem {i}" for i in range(5)]
    other = loads_cluster("name: other\nnodes: [{name: x, gpu: T4, count: 1}]\n")
    assert describe_problems(plan, other, problems, shown=2) == (
        "does not match cluster 'other': the plan was made for 'hexgen-case' (5 problems: problem 0; problem 1; "
        "... and 3 more)")
    assert describe_problems(plan, load_cluster(HEXGEN), problems[:3]) == (
        "does not fit cluster 'hexgen-case' (3 problems: problem 0; problem 1; problem 2)")
