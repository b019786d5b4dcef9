"""Helpers for executor tests: tiny random checkpoints, the transformers reference, plans."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import subprocess
import tempfile
import time

import torch

from hexplan.plan import plan_from_dict


def make_checkpoint(path, *, layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=256,
                    max_pos=256, seed=0, tie=False):
    """A random Llama checkpoint saved with save_pretrained (safetensors, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_pos, tie_word_embeddings=tie, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # Larger weights than the default init: logits spread out, so greedy argmax has clear margins.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


# What the test tokenizer learns from: ASCII and multi-byte text (accents, emoji, CJK, Greek,
# Cyrillic), so characters of 2, 3 and 4 bytes are split across tokens and streamed text is tested.
TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A naïve café owner in Zürich serves crème brûlée "
    "and smörgåsbord; the façade was painted in 1999. Emoji travel too: 😀 🚀 🎉 ✨. "
    "日本語のテキストも少し含めます。中文也可以：你好，世界！ Ελληνικά και русский текст. "
    "Serving large language models on heterogeneous clusters means placing layers on GPUs, "
    "batching requests, and streaming tokens back to every client as soon as they are sampled. ")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(path, vocab_size=256, chat_template=CHAT_TEMPLATE):
    """A tiny byte-level BPE tokenizer trained on TOKENIZER_TEXT (its alphabet: the bytes of that
    text, so every prompt made of its characters encodes), with ``chat_template`` (None: none),
    saved into the checkpoint directory ``path`` where loading.load_tokenizer finds it. Returns
    the tokenizer (transformers' PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    assert tok.get_vocab_size() <= vocab_size
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast


_REF_CACHE: dict = {}


def hf_greedy(checkpoint, prompt, max_new_tokens):
    """Token ids transformers' LlamaForCausalLM.generate produces (greedy, float32, CPU)."""
    from transformers import LlamaForCausalLM

    model = _REF_CACHE.get(checkpoint)
    if model is None:
        model = _REF_CACHE[checkpoint] = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def plan(checkpoint, *pipelines, weights=None):
    """A hand-written plan: pipelines of (node, tp, start, end) stages."""
    pls = []
    for i, stages in enumerate(pipelines):
        used: dict = {}
        st = []
        for node, tp, a, b in stages:
            first = used.get(node, 0)
            used[node] = first + tp
            st.append({"node": node, "gpus": list(range(first, first + tp)), "tp": tp, "layers": [a, b]})
        pls.append({"weight": (weights or [1.0 / len(pipelines)] * len(pipelines))[i], "stages": st})
    return plan_from_dict({"model": checkpoint, "pipelines": pls})


def wait_for(cond, timeout, what, poll=0.1):
    """Poll ``cond()`` until true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- processes (ppid chains read from /proc) ----------------------------------------------------

def proc_stat(pid: int):
    """(state, ppid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    s = proc_stat(pid)
    return s is not None and s[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (ppid chains read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = proc_stat(int(entry))
            if s is not None and s[0] not in ("Z", "X"):
                children.setdefault(s[1], []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = proc_stat(int(entry))
            if s is not None and s[1] == pid and s[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def stop_ranks(inbox, procs, what: str = "TP workers") -> None:
    """Stop the rank processes a test spawned: one "stop" message on ``inbox`` (rank 0 passes it
    on), then join, terminate the stragglers, and check every rank ended cleanly. gloo can abort
    (SIGABRT, -6) a rank whose peer tore the group down first, after the work is done and
    checked; any other exit code is a failure."""
    inbox.put(({"op": "stop"}, []))
    for p in procs:
        p.join(timeout=10)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
        p.join(timeout=5)
    assert not alive, f"{what} did not stop"
    assert all(p.exitcode in (0, -6) for p in procs), [p.exitcode for p in procs]


RAY_NODE = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)


@contextlib.contextmanager
def loopback_ray(*resources: dict):
    """``ray_cluster_on_loopback`` for the ``with`` block, then its driver and raylets shut down.
    One such cluster on the machine at a time: the suite runs its files in parallel (pytest-xdist),
    and two Ray clusters starting at once on two shared cores miss Ray's fixed 30 s raylet
    registration (``ray_cluster_on_loopback``), so a second waits here, on a lock file that
    every worker of the run shares."""
    import ray

    lock = os.path.join(tempfile.gettempdir(), f"hexplan-tests-ray-{os.getuid()}.lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        c = ray_cluster_on_loopback(*resources)
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def ray_cluster_on_loopback(*resources: dict, attempts: int = 2):
    """A ray.cluster_utils.Cluster on 127.0.0.1, one raylet per dict of custom resources (the first
    is the head), this process connected as its driver (hexplan.discover.connect).

    Ray waits a fixed 30 s for a raylet to register; on two shared cores right after another
    module's cluster has shut down, a raylet can miss that ("The current node timed out during
    startup"), and the head's GCS server can be late to write its port file ("Timed out waiting
    for file .../session_.../gcs_server_port_..."; once in a CI run, 2026-12-02). A start that
    fails so is torn down (the late GCS server's processes too: no Cluster holds them) and tried
    again, at most ``attempts`` times."""
    import ray
    from ray.cluster_utils import Cluster

    from hexplan.discover import connect

    for attempt in range(1, attempts + 1):
        c = None
        try:
            c = Cluster(initialize_head=True, head_node_args=dict(RAY_NODE, include_dashboard=False,
                                                                  resources=resources[0]))
            for r in resources[1:]:
                c.add_node(**RAY_NODE, resources=r)
            c.wait_for_nodes(timeout=60)
            assert connect(c.address)
            return c
        except Exception as e:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            late_gcs = re.search(r"Timed out waiting for file (\S*/session_[^/\s]+)/", str(e))
            if late_gcs:   # the half-started head's processes run in its session folder
                subprocess.run(["pkill", "-f", late_gcs.group(1)], check=False)
            if attempt == attempts or not (late_gcs or "timed out during startup" in str(e)):
                raise
            time.sleep(2.0)
