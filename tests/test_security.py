"""The internal API is authenticated (issue 11, item 3) and binds no wildcard address (item 10).

Node executors and stage workers take ``Stage`` calls only with the shared token
(``authorization: Bearer``) and, under mutual TLS, only from a client certificate signed by the
CA; LoadShard reads only under ``--checkpoint-root`` (symlinks resolved) and refuses a ``tp``
the node cannot hold; a stage's downstream is fixed at load (a Forward or Release naming another
downstream makes the worker connect nowhere); a node with neither token nor mutual TLS listens
on loopback only; a TP-2 launch listens on no wildcard address. Loopback only, free ports, every
RPC and wait bounded, every process stopped.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")
pytest.importorskip("cryptography")

from executor_util import descendants, hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg  # noqa: E402
from hexplan.executor.client import generate  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402
from hexplan.executor.wire import Tls, channel, to_proto  # noqa: E402

RPC_S = 20          # deadline of every call
START_S = 90        # a node process to print its ready line
TOKEN = "s3cret-token-for-tests"

U = grpc.StatusCode.UNAUTHENTICATED


# ---- certificates: a CA, a certificate it signs (server and client), a rogue CA's ----------------

def _certs(d):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name, cert, key):
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        return str(d / f"{name}.pem"), str(d / f"{name}.key")

    def build(subject, issuer, key, sign_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                              x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]), False))
        return b.sign(sign_key, hashes.SHA256())

    out = {}
    for tag in ("ca", "rogue"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hexplan test {tag} CA")])
        out[tag] = write(tag, build(ca_name, ca_name, ca_key, ca_key, True), ca_key)[0]
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key, ca_key, False)
        out[tag + "_leaf"] = write(tag + "_leaf", leaf, key)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    c = _certs(tmp_path_factory.mktemp("pki"))
    cert, key = c["ca_leaf"]
    rogue_cert, rogue_key = c["rogue_leaf"]
    return {"server": Tls(cert=cert, key=key, ca=c["ca"]),          # node, worker, gateway: mutual TLS
            "no_cert": Tls(ca=c["ca"]),                              # verifies the server, presents nothing
            "rogue": Tls(cert=rogue_cert, key=rogue_key, ca=c["ca"])}  # presents a certificate of another CA


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A checkpoint root holding a tiny checkpoint; next to it, outside, another directory."""
    base = tmp_path_factory.mktemp("sec")
    (base / "root").mkdir()
    make_checkpoint(base / "root" / "ckpt", layers=2, hidden=32, heads=2, kv_heads=2, intermediate=64, vocab=128)
    (base / "outside").mkdir()
    (base / "outside" / "config.json").write_text("{}")
    (base / "root" / "escape").symlink_to(base / "outside")            # a symlink pointing out of the root
    (base / "token").write_text(TOKEN + "\n")
    os.chmod(base / "token", 0o600)
    return base


# ---- node processes ---------------------------------------------------------------------------

def _readline(stream, timeout):
    line = []
    t = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return line[0] if line else ""


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def node(*args, stderr=None):
    """``hexplan node --listen 127.0.0.1:0`` with ``args``; yields (process, address)."""
    env = {k: v for k, v in os.environ.items() if k != "HEXPLAN_AUTH_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "node", "--listen", "127.0.0.1:0", "--name", "n",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        line = _readline(proc.stdout, START_S)
        assert line.startswith("hexplan node n listening on 127.0.0.1:"), line
        yield proc, line.split()[-1]
    finally:
        _stop(proc)


@contextmanager
def stage_stub(address, tls=None, token=None):
    ch = channel(address, tls, token)
    try:
        yield pbg.StageStub(ch)
    finally:
        ch.close()


def code_of(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=RPC_S, **kw)
    return err.value.code(), err.value.details() or ""


def load_req(checkpoint, **kw):
    kw.setdefault("layer_start", 0)
    kw.setdefault("layer_end", 2)
    return pb.LoadShardRequest(stage_id=kw.pop("stage_id", "s"), checkpoint=str(checkpoint), is_first=True,
                               is_last=True, tp=kw.pop("tp", 1), dtype=kw.pop("dtype", "float32"), **kw)


def forward_req(downstream=()):
    return pb.ForwardRequest(chunks=[pb.SeqChunk(request_id="r", start=0, length=3)],
                             inputs=to_proto(torch.tensor([5, 17, 33])), downstream=list(downstream))


def all_stage_calls(stub, root):
    return [(stub.LoadShard, load_req(root / "root" / "ckpt")), (stub.UnloadShard, pb.UnloadShardRequest(stage_id="s")),
            (stub.Forward, forward_req()), (stub.Release, pb.ReleaseRequest(request_ids=["r"])),
            (stub.Stats, pb.StatsRequest())]


class Decoy:
    """A TCP listener that records every connection made to it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


# ---- a node with a token, without and with mutual TLS -------------------------------------------

@pytest.fixture(scope="module", params=["token", "token+mtls"])
def secured(request, root, pki):
    """(node address, client Tls, the Tls of a client without a certificate or None)."""
    args = ["--auth-token-file", str(root / "token"), "--checkpoint-root", str(root / "root")]
    tls = None
    if request.param == "token+mtls":
        t = pki["server"]
        args += ["--tls-cert", t.cert, "--tls-key", t.key, "--tls-ca", t.ca]
        tls = t
    with node(*args) as (_, address):
        yield address, tls, request.param


def test_every_stage_call_needs_the_token(secured, root):
    address, tls, _ = secured
    for token in (None, "wrong-token", TOKEN + "x", ""):
        with stage_stub(address, tls, token) as stub:
            for call, req in all_stage_calls(stub, root):
                code, details = code_of(call, req)
                assert code == U, (call, token, code, details)
    # health stays open to load balancers (no token), under TLS with the client's certificate
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with channel(address, tls) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=RPC_S).status == 1
    with stage_stub(address, tls, TOKEN) as stub:
        assert stub.Stats(pb.StatsRequest(), timeout=RPC_S).name == "n"


def test_load_shard_is_confined_to_the_checkpoint_root(secured, root):
    address, tls, _ = secured
    P = grpc.StatusCode.PERMISSION_DENIED
    with stage_stub(address, tls, TOKEN) as stub:
        for path in ("/etc", "/etc/passwd", "/no/such/dir", root / "outside", root / "root" / "escape",
                     root / "root" / ".." / "outside", root / "root" / "escape" / "..", "", "relative/dir"):
            code, details = code_of(stub.LoadShard, load_req(path))
            assert code == P and "--checkpoint-root" in details, (path, code, details)
        # inside the root the request gets past confinement, to the ordinary checks
        code, details = code_of(stub.LoadShard, load_req(root / "root" / "missing"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a directory" in details
        code, details = code_of(stub.LoadShard, load_req(root / "root" / "ckpt", tp=10_000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tp:"), details
        code, details = code_of(stub.LoadShard, load_req(root / "root" / "ckpt", dtype="float64; rm -rf"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("dtype:"), details
        for cal in ({"calibrate_batches": [0]}, {"calibrate_batches": [1 << 20]},
                    {"calibrate_batches": list(range(1, 40))}, {"calibrate_context": -1},
                    {"calibrate_context": 1 << 30}):
            code, details = code_of(stub.LoadShard, load_req(root / "root" / "ckpt", **cal))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("calibrate_batches"), (cal, details)
        assert list(stub.Stats(pb.StatsRequest(), timeout=RPC_S).stages) == []


def test_downstream_is_fixed_at_load_and_workers_check_the_token(secured, root):
    address, tls, _ = secured
    decoy = Decoy()
    try:
        with stage_stub(address, tls, TOKEN) as node_stub:
            worker = node_stub.LoadShard(load_req(root / "root" / "ckpt"), timeout=120).address
            try:
                with stage_stub(worker, tls, None) as anon, stage_stub(worker, tls, "wrong") as wrong:
                    for s in (anon, wrong):
                        assert code_of(s.Forward, forward_req())[0] == U
                        assert code_of(s.Release, pb.ReleaseRequest(request_ids=["r"]))[0] == U
                        assert code_of(s.Stats, pb.StatsRequest())[0] == U
                with stage_stub(worker, tls, TOKEN) as s:
                    # a caller naming another downstream: ignored, the (last) stage answers itself
                    resp = s.Forward(forward_req([decoy.address, "127.0.0.1:1"]), timeout=RPC_S)
                    assert list(resp.logits.shape) == [1, 128]
                    s.Release(pb.ReleaseRequest(request_ids=["r"], downstream=[decoy.address]), timeout=RPC_S)
                    assert s.Stats(pb.StatsRequest(), timeout=RPC_S).sequences == 0
                time.sleep(0.5)
                assert decoy.connections == 0, "the worker connected to a downstream a caller named"
            finally:
                node_stub.UnloadShard(pb.UnloadShardRequest(stage_id="s"), timeout=60)
    finally:
        decoy.close()


def test_mutual_tls_refuses_clients_without_a_good_certificate(pki, root):
    """Mutual TLS alone (no token): a client certificate of the CA is the credential."""
    t = pki["server"]
    with node("--checkpoint-root", str(root / "root"), "--tls-cert", t.cert, "--tls-key", t.key,
              "--tls-ca", t.ca) as (_, address):
        for bad in (pki["no_cert"], pki["rogue"], None):
            with stage_stub(address, bad, TOKEN) as stub:
                code, _ = code_of(stub.Stats, pb.StatsRequest())
                assert code in (grpc.StatusCode.UNAVAILABLE, U), code   # the handshake fails
                assert code_of(stub.LoadShard, load_req("/etc"))[0] in (grpc.StatusCode.UNAVAILABLE, U)
        with stage_stub(address, t, None) as stub:     # a good certificate, no token: past authentication
            assert stub.Stats(pb.StatsRequest(), timeout=RPC_S).name == "n"
            assert code_of(stub.LoadShard, load_req("/etc"))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_node_without_token_or_mtls_stays_on_loopback(root):
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", "node", "--listen", "0.0.0.0:0", "--name", "n"],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "HEXPLAN_AUTH_TOKEN"})
    assert out.returncode == 2, out
    assert out.stderr.startswith("hexplan: error: --listen: refusing to listen on 0.0.0.0"), out.stderr
    assert "--auth-token-file" in out.stderr and "Traceback" not in out.stderr
    # on loopback it runs, says so in one line, and (no --checkpoint-root) loads nothing
    with node(stderr=subprocess.PIPE) as (proc, address):
        warning = _readline(proc.stderr, 30)
        assert warning.startswith("hexplan: warning: node n authenticates no caller"), warning
        with stage_stub(address) as stub:
            code, details = code_of(stub.LoadShard, load_req(root / "root" / "ckpt"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "no --checkpoint-root" in details


# ---- whole launches -----------------------------------------------------------------------------

def _listening(pids):
    """(local address hex, port) of every listening TCP socket the processes ``pids`` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:      # LISTEN
                ip, port = f[1].split(":")
                out.append((ip, int(port, 16)))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tp2_launch_with_token_binds_no_wildcard_and_matches_transformers(root):
    ckpt = str(root / "root" / "ckpt")
    with Launch(plan(ckpt, [("a", 2, 0, 1), ("b", 1, 1, 2)]), ckpt, threads=1) as L:
        got = generate(L.address, token_ids=[5, 17, 33], max_new_tokens=6, timeout=120)
        assert got["token_ids"] == hf_greedy(ckpt, [5, 17, 33], 6)
        pids = [os.getpid(), *descendants(os.getpid())]
        assert len(pids) >= 1 + 2 + 3, pids            # this process, 2 nodes, 3 workers
        sockets = _listening(pids)
        assert sockets, "no listening socket found"
        wildcard = [s for s in sockets if set(s[0]) == {"0"}]
        assert not wildcard, f"listening on a wildcard address: {wildcard} of {sockets}"
        loopback = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
        assert all(s[0] in loopback for s in sockets), sockets    # 127.0.0.1, ::1, ::ffff:127.0.0.1
        # the token travels in the environment, never on a command line
        for name in ("a", "b"):
            cmdline = open(f"/proc/{L.node_process(name).pid}/cmdline", "rb").read()
            assert L.auth_token.encode() not in cmdline and b"--checkpoint-root" in cmdline
        # the launch's stages and nodes refuse a caller without the token
        stage = L.gateway.pipelines[0].stages[0]
        for addr in (stage, L.nodes["a"][1]):
            with stage_stub(addr) as stub:
                assert code_of(stub.Stats, pb.StatsRequest())[0] == U
                assert code_of(stub.Release, pb.ReleaseRequest(request_ids=["x"]))[0] == U
        with stage_stub(stage, None, L.auth_token) as stub:
            assert stub.Stats(pb.StatsRequest(), timeout=RPC_S).stages == ["p0s0"]


def test_launch_over_mutual_tls_matches_transformers(root, pki):
    ckpt = str(root / "root" / "ckpt")
    with Launch(plan(ckpt, [("a", 1, 0, 2)]), ckpt, tls=pki["server"], threads=1) as L:
        # users of the gateway need no client certificate
        got = generate(L.address, token_ids=[9, 8, 7, 6], max_new_tokens=5, tls=pki["no_cert"], timeout=120)
        assert got["token_ids"] == hf_greedy(ckpt, [9, 8, 7, 6], 5)
        stage = L.gateway.pipelines[0].stages[0]
        with stage_stub(stage, pki["no_cert"], L.auth_token) as stub:   # the token without a certificate
            assert code_of(stub.Stats, pb.StatsRequest())[0] in (grpc.StatusCode.UNAVAILABLE, U)
