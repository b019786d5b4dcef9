"""`hexplan profile`: per-layer times of a tiny random checkpoint on the CPU, the LM head's table
and (TP 2 over gloo on loopback) the all-reduce's, the YAML section it writes, `--merge` into a
cluster file (comments kept) that the cost model then reads, and bad input (exit 2, one line
naming the flag). Grids are tiny: the whole file takes seconds; the numbers are only checked for
shape and sanity, not speed."""
from __future__ import annotations

import copy
import statistics
import subprocess
import sys

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("grpc")

from executor_util import make_checkpoint, plan  # noqa: E402

from hexplan import load_cluster  # noqa: E402
from hexplan.cluster import loads_cluster  # noqa: E402
from hexplan.costmodel import allreduce_time, decode_layer_time, lm_head_time, prefill_layer_time  # noqa: E402
from hexplan.gpus import catalog_name_for_device  # noqa: E402
from hexplan.models import load_model  # noqa: E402
from hexplan.yamlio import set_entry  # noqa: E402

# One thread: two torch threads on a shared machine with less than two free cores spin against each
# other and some points come out 10-100x slow (docs/executor.md); the default count is checked in
# test_profile_checkpoint_in_process.
GRID = ["--decode-batches", "1,4", "--prefill-tokens", "8,128", "--layers", "2", "--repeats", "3",
        "--warmup", "1", "--context", "32", "--threads", "1"]
CLUSTER = """\
# A hand-written cluster: these comments must survive --merge.
name: tiny   # trailing comment
nodes:
  - {name: n0, gpu: cpu, count: 2}   # the CPU type is built in
network:
  default: {bandwidth: 10Gbps, latency: 0.1ms}
# the end
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("p") / "tiny-llama", layers=4, hidden=64, heads=4, kv_heads=2,
                           intermediate=128, vocab=256, max_pos=256)


def hexplan(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=180, cwd=cwd)


def one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hexplan: error: "), r.stderr
    assert r.stdout == ""
    return lines[0][len("hexplan: error: "):]


def tables_of(doc, gpu="cpu", model="tiny-llama", tp=1, served=False):
    assert list(doc) == ["gpu_types"] and list(doc["gpu_types"]) == [gpu], doc
    assert list(doc["gpu_types"][gpu]) == ["profiles"] and list(doc["gpu_types"][gpu]["profiles"]) == [model], doc
    t = doc["gpu_types"][gpu]["profiles"][model]
    if tp > 1:   # the degree's own tables, beside the all-reduce's
        assert list(t) == ["by_tp", "allreduce_ms", "allreduce_tp"] and list(t["by_tp"]) == [tp], t
        assert list(t["by_tp"][tp]) == ["decode_ms", "prefill_ms", "lm_head_ms"], t
        return {**t["by_tp"][tp], "allreduce_ms": t["allreduce_ms"], "allreduce_tp": t["allreduce_tp"]}
    assert list(t) == ["decode_ms", "prefill_ms", "lm_head_ms"] + (["call_ms"] if served else []), t
    return t


def check_tables(t):
    assert list(t["decode_ms"]) == [1, 4] and list(t["prefill_ms"]) == [8, 128], t
    assert list(t["lm_head_ms"]) == [1, 4], t                # the head at the decode batches (logits rows)
    values = list(t["decode_ms"].values()) + list(t["prefill_ms"].values()) + list(t["lm_head_ms"].values())
    assert all(isinstance(v, float) and 0 < v < 1e4 for v in values), t
    # 16 times the tokens through the same layers: not much faster. (Only a coarse bound: on a
    # shared machine a busy spell can stretch the small prompt's repetitions several times.)
    assert t["prefill_ms"][128] > 0.25 * t["prefill_ms"][8], t


# ---- the command -------------------------------------------------------------------------------

def test_stdout_is_only_the_yaml_section(ckpt):
    r = hexplan("profile", "--checkpoint", ckpt, *GRID)
    assert r.returncode == 0, r.stderr
    t = tables_of(yaml.safe_load(r.stdout))
    check_tables(t)
    # stdout: the YAML document and its comment header, nothing else; progress went to stderr
    assert all(line.startswith(("#", "gpu_types:", " ")) for line in r.stdout.splitlines()), r.stdout
    assert "hexplan:" not in r.stdout
    progress = [line for line in r.stderr.splitlines() if "ms/layer at TP 1" in line]
    assert len(progress) == 4, r.stderr
    assert sum("LM head" in line and "ms/step at TP 1" in line for line in r.stderr.splitlines()) == 2, r.stderr
    assert "lm_head_ms: ms per step" in r.stdout
    # the default model name is the one a plan built from the checkpoint gives it
    assert load_model(ckpt).name == "tiny-llama"
    assert plan(ckpt, [("n0", 1, 0, 4)]).model.name == "tiny-llama"


def test_served_times_decode_through_a_node_and_stops_it(ckpt):
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--served")
    assert r.returncode == 0, r.stderr
    t = tables_of(yaml.safe_load(r.stdout), served=True)
    check_tables(t)
    assert "through a served worker" in r.stdout           # the header says where decode_ms comes from
    assert "call_ms: ms per Forward call" in r.stdout
    served = [line for line in r.stderr.splitlines() if "served decode batch" in line]
    assert len(served) == 2 and all("mean context" in line for line in served), r.stderr
    small = [line for line in r.stderr.splitlines() if "served 1-layer step batch" in line]
    assert len(small) == 2, r.stderr
    # the served step of 2 layers = call + 2 layers + LM head, the call a line through the two
    # batches' splits (floored at 0), as the progress lines report the steps
    steps, smalls = {}, {}
    for line, one, b in zip(served, small, (1, 4)):
        steps[b] = float(line.split("(step ")[1].split(" ms")[0])
        smalls[b] = float(one.split("batch")[1].split(": ")[1].split(" ms")[0])
        head, layer, call = t["lm_head_ms"][b], t["decode_ms"][b], t["call_ms"][b]
        assert 2 * layer + call + head == pytest.approx(steps[b], rel=0.01, abs=2e-3), (line, t)
    from hexplan.executor.profile_served import split_calls
    _, want = split_calls(steps, smalls, 2, 1, t["lm_head_ms"])
    assert [t["call_ms"][b] for b in (1, 4)] == pytest.approx([max(want[b], 1e-6) for b in (1, 4)], rel=0.02, abs=2e-3)
    # the prompts too, through the 2-layer shard: a served prompt's step = its call (one
    # sequence) + 2 layers + the LM head on one row
    prompts = [line for line in r.stderr.splitlines() if "served prefill" in line]
    assert len(prompts) == 2, r.stderr
    for line, n in zip(prompts, (8, 128)):
        step = float(line.split("(step ")[1].split(" ms")[0])
        want_ms = max((step - t["lm_head_ms"][1] - t["call_ms"][1]) / 2, 1e-6)
        # (the progress line rounds the step to 0.01 ms: up to 0.0025 ms a layer here)
        assert t["prefill_ms"][n] == pytest.approx(want_ms, rel=0.01, abs=3e-3), (line, t)
    # the node it started is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [a for a in ps.splitlines() if "hexplan.cli node" in a and "--name profile" in a], ps


def test_split_calls_keeps_the_call_non_decreasing_and_the_layers_keep_the_rest_of_each_step():
    from hexplan.executor.profile_served import monotone, raw_call, split_calls

    assert monotone([1.0, 3.0, 2.0, 4.0, 0.0]) == pytest.approx([1.0, 2.25, 2.25, 2.25, 2.25])
    assert monotone([1.0, 2.0, 5.0]) == [1.0, 2.0, 5.0]

    # step(B, L) = call(B) + L x layer(B) + head(B), the call 1 + 0.5 B ms: exact data, exact split
    layer, head = {1: 2.0, 4: 3.0, 16: 6.0}, {1: 3.0, 4: 5.0, 16: 9.0}
    call = {b: 1.0 + 0.5 * b for b in layer}
    step6 = {b: call[b] + 6 * layer[b] + head[b] for b in layer}
    step1 = {b: call[b] + layer[b] + head[b] for b in layer}
    assert raw_call(step6[4], step1[4], 6, 1, head[4]) == pytest.approx(call[4])
    got_layer, got_call = split_calls(step6, step1, 6, 1, head)
    assert got_call == pytest.approx(call) and got_layer == pytest.approx(layer)
    # noise in one batch's 1-layer step that makes its call exceed a larger batch's: pooled with
    # it, nearer the truth than that batch's own split, and every batch's layers and call still
    # add up to its served step
    noisy = {**step1, 4: step1[4] + 6.0}
    got_layer, got_call = split_calls(step6, noisy, 6, 1, head)
    assert abs(got_call[4] - call[4]) < abs(raw_call(step6[4], noisy[4], 6, 1, head[4]) - call[4])
    for b in layer:
        assert 6 * got_layer[b] + got_call[b] + head[b] == pytest.approx(step6[b])
    # calls below 0 are floored at 0, and the layers keep the whole step
    bare = {b: 6 * layer[b] + head[b] for b in layer}               # no call, and 1-layer steps 3 ms fast:
    fast = {b: layer[b] + head[b] - 3.0 for b in layer}              # the slope leaves -3.6 ms for the call
    assert raw_call(bare[4], fast[4], 6, 1, head[4]) == pytest.approx(-3.6)
    got_layer, got_call = split_calls(bare, fast, 6, 1, head)
    assert got_call == {1: 0.0, 4: 0.0, 16: 0.0}
    assert got_layer == pytest.approx(layer)


def test_timed_in_rounds_gives_every_key_the_same_share_of_a_drifting_host():
    from hexplan.executor.profile_served import timed_in_rounds

    # every key costs the same, the host slows 1% a call: each key's median must come out alike
    # (back to back, the last key's would be 1.8x the first's here)
    calls = []

    def step(k):
        calls.append(k)
        return 1.0 + 0.01 * len(calls)

    keys = list(range(1, 17)) + [32, 64]
    times = timed_in_rounds(keys, 1, 4, step)
    assert len(calls) == 5 * len(keys) and all(len(times[k]) == 5 for k in keys)
    assert calls[:len(keys)] == keys and calls[len(keys):2 * len(keys)] == keys[::-1]   # forward, then back
    medians = [statistics.median(times[k][1:]) for k in keys]
    assert max(medians) / min(medians) < 1.05, medians
    means = [statistics.mean(times[k][1:]) for k in keys]   # an even number of timed rounds: exactly alike
    assert max(means) - min(means) == pytest.approx(0.0, abs=1e-9)


def test_timed_in_rounds_settles_each_timed_step_on_its_own_key():
    from hexplan.executor.profile_served import timed_in_rounds

    # a step right after another key's is 1.3x slower (on a CPU: the other shard's worker process
    # still on the cores); with settle=1 every timed step follows one of its own key, as in a server
    calls = []

    def step(k):
        took = 1.0 if calls and calls[-1] == k else 1.3
        calls.append(k)
        return took

    keys = [1, 2, 4, 8]
    cold = timed_in_rounds(keys, 1, 4, step)
    assert all(t == 1.3 for k in keys[1:-1] for t in cold[k])   # (the end keys repeat at the turns)
    calls.clear()
    warm = timed_in_rounds(keys, 1, 4, step, settle=1)
    assert len(calls) == 2 * 5 * len(keys) and all(len(warm[k]) == 5 for k in keys)
    assert all(t == 1.0 for k in keys for t in warm[k])
    assert calls[:2 * len(keys)] == [k for k in keys for _ in range(2)]   # still in rounds
    assert calls[2 * len(keys):4 * len(keys)] == [k for k in keys[::-1] for _ in range(2)]


def test_output_file_and_names(ckpt, tmp_path):
    out = tmp_path / "p.yaml"
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--gpu-type", "A100-40G", "--model", "my-llama", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    check_tables(tables_of(yaml.safe_load(out.read_text()), "A100-40G", "my-llama"))


def test_merge_keeps_the_file_and_the_cost_model_uses_the_profile(ckpt, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--merge", cluster)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""                                   # --merge without -o: the file is the result
    text = cluster.read_text()
    assert text.startswith(CLUSTER.removesuffix("# the end\n")), text   # every old line, comments included
    assert "# the end" in text
    t = tables_of({"gpu_types": yaml.safe_load(text)["gpu_types"]})
    check_tables(t)

    c = load_cluster(cluster)
    model = load_model(ckpt)
    gpu = c.nodes[0].gpu
    assert gpu.profile_for("tiny-llama") is not None
    for b, ms in t["decode_ms"].items():
        assert decode_layer_time(model, gpu, 1, b, 100, 1e9) == pytest.approx(ms / 1e3)
        # at TP 2 the profile is halved and the modelled all-reduces added
        assert decode_layer_time(model, gpu, 2, b, 100, 1e9) > ms / 2e3
    for p, ms in t["prefill_ms"].items():
        assert prefill_layer_time(model, gpu, 1, p, 1e9) == pytest.approx(ms / 1e3)
    for b, ms in t["lm_head_ms"].items():                   # the head's table, not its roofline
        assert lm_head_time(model, gpu, 1, b) == pytest.approx(ms / 1e3)
        assert lm_head_time(model, gpu, 2, b) == pytest.approx(ms / 2e3)

    # profiling again replaces the entry, and adds a second model beside it
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--merge", cluster, "--model", "other", "-o", "-")
    assert r.returncode == 0, r.stderr
    tables_of(yaml.safe_load(r.stdout), model="other")
    profiles = yaml.safe_load(cluster.read_text())["gpu_types"]["cpu"]["profiles"]
    assert list(profiles) == ["tiny-llama", "other"]
    assert cluster.read_text().count("# the CPU type is built in") == 1


def test_tp2_on_cpu_over_gloo(ckpt):
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--tp", "2")
    assert r.returncode == 0, r.stderr
    t = tables_of(yaml.safe_load(r.stdout), tp=2)
    check_tables(t)
    assert "all-reduces taken out) x 2" in r.stdout
    assert r.stderr.count("all-reduce") >= 4, r.stderr
    # one all-reduce at the decode batches' and the prompts' rows, measured at TP 2
    assert t["allreduce_tp"] == 2
    assert list(t["allreduce_ms"]) == [1, 4, 8, 128], t
    assert all(isinstance(v, float) and 0 < v < 1e4 for v in t["allreduce_ms"].values()), t
    # the cluster parser takes the section, and the cost model charges the measured all-reduces
    c = loads_cluster(yaml.safe_dump({"gpu_types": yaml.safe_load(r.stdout)["gpu_types"],
                                      "nodes": [{"name": "n0", "gpu": "cpu", "count": 2}]}))
    gpu, model = c.nodes[0].gpu, load_model(ckpt)
    for b, ms in t["allreduce_ms"].items():
        assert allreduce_time(model, gpu, 2, b, 1e9) == pytest.approx(ms / 1e3)
    assert decode_layer_time(model, gpu, 2, 4, 100, 1e9) == pytest.approx(
        (t["decode_ms"][4] / 2 + 2 * t["allreduce_ms"][4]) / 1e3)


TP1_ENTRY = """gpu_types:
  cpu:
    profiles:
      tiny-llama:   # measured at TP 1 earlier
        decode_ms: {1: 100.0, 4: 200.0}
        prefill_ms: {8: 300.0, 128: 900.0}
        lm_head_ms: {1: 50.0, 4: 60.0}
        call_ms: {1: 1.0, 4: 2.0}
"""


def test_tp2_merge_keeps_the_tp1_tables_and_each_degree_is_charged_its_own(ckpt, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(TP1_ENTRY + CLUSTER)
    r = hexplan("profile", "--checkpoint", ckpt, *GRID, "--tp", "2", "--merge", cluster)
    assert r.returncode == 0, r.stderr
    assert "keeping its decode_ms, prefill_ms, lm_head_ms, call_ms" in r.stderr, r.stderr
    text = cluster.read_text()
    assert "# measured at TP 1 earlier" in text and "# the end" in text, text
    entry = yaml.safe_load(text)["gpu_types"]["cpu"]["profiles"]["tiny-llama"]
    assert entry["decode_ms"] == {1: 100.0, 4: 200.0} and entry["call_ms"] == {1: 1.0, 4: 2.0}, entry
    own = entry["by_tp"][2]
    check_tables(own)
    c, model = load_cluster(cluster), load_model(ckpt)
    gpu = c.nodes[0].gpu
    # a TP-1 group is charged the TP-1 table, a TP-2 group its own degree's (the measured ones)
    assert decode_layer_time(model, gpu, 1, 4, 100, 1e9) == pytest.approx(0.2)
    assert prefill_layer_time(model, gpu, 1, 128, 1e9) == pytest.approx(0.9)
    assert lm_head_time(model, gpu, 1, 4) == pytest.approx(0.06)
    assert decode_layer_time(model, gpu, 2, 4, 100, 1e9) == pytest.approx(
        (own["decode_ms"][4] / 2 + 2 * entry["allreduce_ms"][4]) / 1e3)
    assert prefill_layer_time(model, gpu, 2, 128, 1e9) == pytest.approx(
        (own["prefill_ms"][128] / 2 + 2 * entry["allreduce_ms"][128]) / 1e3)
    assert lm_head_time(model, gpu, 2, 4) == pytest.approx(own["lm_head_ms"][4] / 2e3)


def test_merged_profile_keeps_the_other_degrees():
    from hexplan.cli import _merged_profile

    tp1 = {"decode_ms": {1: 1.0}, "prefill_ms": {8: 2.0}, "call_ms": {1: 0.5}}
    tp2 = {"by_tp": {2: {"decode_ms": {1: 3.0}, "prefill_ms": {8: 4.0}}}, "allreduce_ms": {1: 0.2}, "allreduce_tp": 2}
    tp4 = {"by_tp": {4: {"decode_ms": {1: 5.0}, "prefill_ms": {8: 6.0}}}, "allreduce_ms": {1: 0.3}, "allreduce_tp": 4}
    e, kept = _merged_profile({}, tp2, 2)
    assert e == tp2 and kept == ""
    e, kept = _merged_profile(e, tp4, 4)      # the newer all-reduce table wins; both degrees stay
    assert e["by_tp"] == {2: tp2["by_tp"][2], 4: tp4["by_tp"][4]} and e["allreduce_tp"] == 4 and kept == "by_tp.2"
    e, kept = _merged_profile(e, tp1, 1)      # a TP-1 run replaces the TP-1 tables only
    assert e["decode_ms"] == {1: 1.0} and e["call_ms"] == {1: 0.5} and list(e["by_tp"]) == [2, 4]
    assert e["allreduce_ms"] == {1: 0.3} and kept == "allreduce_ms, allreduce_tp, by_tp.2, by_tp.4"
    e, kept = _merged_profile(e, {"decode_ms": {1: 9.0}, "prefill_ms": {8: 9.0}}, 1)   # no call_ms this time
    assert "call_ms" not in e and e["decode_ms"] == {1: 9.0}
    e, kept = _merged_profile(e, tp2, 2)      # re-profiling a degree replaces it
    assert e["by_tp"][2] == tp2["by_tp"][2] and e["decode_ms"] == {1: 9.0} and e["allreduce_tp"] == 2


@pytest.mark.parametrize("args, flag", [
    (["--checkpoint", "{tmp}/nope"], "--checkpoint"),
    (["--checkpoint", "{tmp}"], "--checkpoint"),                       # a directory without config.json
    (["--checkpoint", "{ckpt}", "--device", "cuda"], "--device"),
    (["--checkpoint", "{ckpt}", "--tp", "3"], "--tp"),                 # 4 heads
    (["--checkpoint", "{ckpt}", "--tp", "8"], "--tp"),                 # more ranks than heads
    (["--checkpoint", "{ckpt}", "--tp", "0"], "--tp"),
    (["--checkpoint", "{ckpt}", "--layers", "5"], "--layers"),
    (["--checkpoint", "{ckpt}", "--context", "256"], "--context"),     # 256 positions
    (["--checkpoint", "{ckpt}", "--decode-batches", "1,two"], "--decode-batches"),
    (["--checkpoint", "{ckpt}", "--prefill-tokens", "0"], "--prefill-tokens"),
    (["--checkpoint", "{ckpt}", "--prefill-tokens", "300,400"], "--prefill-tokens"),
    (["--checkpoint", "{ckpt}", "--repeats", "0"], "--repeats"),
    (["--checkpoint", "{ckpt}", "--served", "--tp", "2"], "--served"),
    (["--checkpoint", "{ckpt}", "-o", "{tmp}/no/such/dir/p.yaml"], "--output"),
    (["--checkpoint", "{ckpt}", "--merge", "{tmp}/c.yaml", "--gpu-type", "Z100"], "--gpu-type"),
])
def test_bad_input(ckpt, tmp_path, args, flag):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "c.yaml").write_text(CLUSTER)
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    msg = one_error_line(hexplan("profile", *args))
    assert msg.startswith(flag + ": "), msg
    assert (tmp_path / "c.yaml").read_text() == CLUSTER


def test_bad_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = one_error_line(hexplan("profile", "--checkpoint", tmp_path))
    assert "config.json" in msg and "num_attention_heads" in msg, msg


# ---- the library -------------------------------------------------------------------------------

def test_profile_checkpoint_in_process(ckpt):
    from hexplan.executor.profile import ProfileSpec, profile_checkpoint, worker_threads

    seen = []
    threads = torch.get_num_threads()
    spec = ProfileSpec(ckpt, layers=3, context=16, decode_batches=(2, 1), prefill_tokens=(4,), repeats=2, warmup=0)
    r = profile_checkpoint(spec, lambda p, done, total: seen.append((p.kind, p.x, done, total)))
    assert seen == [("decode", 2, 1, 5), ("decode", 1, 2, 5), ("prefill", 4, 3, 5), ("head", 2, 4, 5),
                    ("head", 1, 5, 5)]
    for p in r.points:   # TP 1: no all-reduce, the table value is the median step over the layers
        assert p.allreduce_ms == 0 and p.per_allreduce_ms == 0
        assert p.ms == pytest.approx(p.step_ms / (1 if p.kind == "head" else 3))
    assert set(r.decode_ms) == {1, 2} and set(r.prefill_ms) == {4} and set(r.lm_head_ms) == {1, 2}
    assert r.allreduce_ms == {}
    # a served worker's threads (cores / TP, as `hexplan launch` gives a one-stage plan), then back
    assert f"{worker_threads(1)} threads" in r.device_name
    assert torch.get_num_threads() == threads


def test_profile_runs_the_stage_step_on_real_caches(ckpt, monkeypatch):
    """Every step goes through StageModel.forward_parts, the worker's call: first one prompt of
    `context` tokens (the real KV cache the decode sequences get copies of), then decode steps at
    position `context`, prompts from 0, and the LM head on a last stage of no layers."""
    from hexplan.executor import profile
    from hexplan.executor.model import StageModel

    calls = []
    real = StageModel.forward_parts

    def spy(self, chunks, inputs, *a, **k):
        calls.append((len(self.layers), self.shard.is_last, [(c.start, c.length) for c in chunks],
                      [self.caches[c.request_id].length for c in chunks if c.request_id in self.caches]))
        return real(self, chunks, inputs, *a, **k)
    monkeypatch.setattr(StageModel, "forward_parts", spy)
    spec = profile.ProfileSpec(ckpt, layers=2, context=12, decode_batches=(3,), prefill_tokens=(5,), repeats=1,
                               warmup=0)
    profile.profile_checkpoint(spec)
    assert calls[0] == (2, False, [(0, 12)], [])                       # the prompt behind the caches
    assert calls[1] == (2, False, [(12, 1)] * 3, [12] * 3)             # decode of 3 on 12 positions each
    assert calls[2] == (2, False, [(0, 5)], [])                        # a prompt alone
    assert calls[3] == (0, True, [(12, 1)] * 3, [12] * 3)              # the LM head: no layers, last stage
    assert len(calls) == 4


def test_tp_normalisation_takes_the_all_reduces_out(ckpt):
    """TP 2 layout on a one-process gloo group whose all-reduces are stretched by 3 ms each
    (SlowLink): the table is (step - all-reduce) x 2 / layers, and the all-reduce time is the
    stretched one. One repetition, so the medians are the values themselves."""
    import torch.distributed as dist

    from executor_util import free_port
    from hexplan.executor.distributed import SlowLink, TPContext
    from hexplan.executor.profile import ProfileSpec, measure

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ctx = TPContext(0, 2, dist.group.WORLD, "cpu", SlowLink(3e-3, 1e12))
        spec = ProfileSpec(ckpt, tp=2, layers=2, context=16, decode_batches=(2,), prefill_tokens=(8,), repeats=1,
                           warmup=0, lm_head=False)
        points = measure(spec, ctx, "cpu")
    finally:
        dist.destroy_process_group()
    assert [(p.kind, p.x) for p in points] == [("decode", 2), ("prefill", 8)]
    for p in points:
        assert p.allreduce_ms >= 2 * 2 * 3.0               # 2 layers x 2 all-reduces x 3 ms
        assert p.step_ms > p.allreduce_ms
        assert p.ms == pytest.approx((p.step_ms - p.allreduce_ms) * 2 / 2, rel=1e-6)
        # one all-reduce as the step costs it: the step beyond the compute, over 2 x 2 all-reduces
        assert p.per_allreduce_ms == pytest.approx(p.allreduce_ms / 4, rel=1e-6)
        assert p.per_allreduce_ms >= 3.0


def test_catalog_name_for_device():
    assert catalog_name_for_device("NVIDIA H200") == "H200"
    assert catalog_name_for_device("NVIDIA H100 80GB HBM3") == "H100-80G"
    assert catalog_name_for_device("NVIDIA H100 PCIe") is None          # not the catalog's SXM figures
    assert catalog_name_for_device("NVIDIA A100-SXM4-40GB") == "A100-40G"
    assert catalog_name_for_device("NVIDIA A100-SXM4-80GB") == "A100-80G"
    assert catalog_name_for_device("NVIDIA A100", 85e9) == "A100-80G"   # memory from the device
    assert catalog_name_for_device("NVIDIA L40S") == "L40S"
    assert catalog_name_for_device("NVIDIA L4") == "L4"
    assert catalog_name_for_device("NVIDIA L40") is None
    assert catalog_name_for_device("Tesla T4") == "T4"
    assert catalog_name_for_device("NVIDIA GeForce RTX 4090") == "RTX4090"
    assert catalog_name_for_device("NVIDIA GeForce RTX 3090 Ti") is None


# ---- editing YAML in place ---------------------------------------------------------------------

PATH = ("gpu_types", "cpu", "profiles", "m")
VALUE = {"decode_ms": {1: 0.5, 2: 0.75}, "prefill_ms": {16: 1.5}}


@pytest.mark.parametrize("text", [
    "",
    "# only a comment\n",
    "name: x  # c\nnodes: []\n# tail\n",
    "name: x\nnodes: []",                                                   # no final newline
    "gpu_types:\n  # mine\n  G: {memory: 1GB}  # note\nnodes: []\n",
    "gpu_types: {G: {memory: 1GB}}\nnodes: []\n",
    "gpu_types: {}\nnodes: []\n",
    "gpu_types:\nnodes: []\n",                                               # null on the way
    "gpu_types:\n  cpu:\n    memory: 16GB   # more\n    # end of cpu\nnodes: []\n",
    "gpu_types:\n  cpu:\n    profiles:\n      other: {decode_ms: {1: 2}}\n# c\nnodes: []\n",
    "gpu_types:\n  cpu:\n    profiles:\n      m:\n        decode_ms: {1: 2}  # old\n        prefill_ms:\n"
    "          5: 6\n      z: {decode_ms: {1: 1}}\nnodes: []\n",          # replace a block entry
    "gpu_types: {cpu: {profiles: {m: {decode_ms: {1: 2}}, z: {decode_ms: {1: 1}}}}}\nnodes: []\n",
    "gpu_types:\n  cpu:\n    profiles:\n      m: {decode_ms: {1: 2}}\nnodes:\n- name: a\n  gpu: cpu\n",
])
def test_set_entry_keeps_everything_else(text):
    out, kept = set_entry(text, PATH, VALUE)
    assert kept
    assert yaml.safe_load(out) == with_entry(yaml.safe_load(text))
    for line in text.splitlines():   # every comment survives, but those inside the replaced entry
        if "#" in line and "# old" not in line:
            assert "#" + line.split("#", 1)[1] in out, (line, out)


def with_entry(data):
    d = copy.deepcopy(data) or {}
    node = d
    for key in PATH[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[PATH[-1]] = VALUE
    return d


def test_set_entry_falls_back_to_a_rewrite():
    # An alias into the path: editing the anchor's text would change both places; rewritten instead.
    text = "base: &b {profiles: {}}\ngpu_types:\n  cpu: *b\n"
    out, kept = set_entry(text, PATH, VALUE)
    assert not kept
    data = yaml.safe_load(out)
    assert data["gpu_types"]["cpu"]["profiles"]["m"] == VALUE and data["base"] == {"profiles": {}}
