"""What a fresh machine sees: the layout (a module's file is its import path), a wheel that works
when run from the source root, a clean stdout for every ``--json`` / ``-o -`` document, and the
README's test command being exactly what CI runs."""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = (ROOT, ROOT / "solver", ROOT / "executor")   # each holds a hexplan/ of its own
CLI = [sys.executable, "-m", "hexplan.cli"]


def _modules():
    for folder in SOURCE_FOLDERS:
        for path in sorted((folder / "hexplan").rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_every_module_file_is_its_import_path():
    found = list(_modules())
    names = [n for n, _ in found]
    assert "hexplan.solver.milp" in names and "hexplan.executor.gateway" in names and "hexplan.cli" in names
    assert len(names) == len(set(names)), "two files claim one module name"
    for name, path in found:
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).resolve() == path.resolve(), (name, spec and spec.origin)
    # only the core folder makes hexplan a package; the others are portions of it
    assert not (ROOT / "solver" / "hexplan" / "__init__.py").exists()
    assert not (ROOT / "executor" / "hexplan" / "__init__.py").exists()


def test_a_clone_named_hexplan_does_not_shadow_the_package(tmp_path):
    """Run from the folder that holds the clone (itself named hexplan, with no __init__.py): the
    clone must not be taken for a namespace package."""
    (tmp_path / "hexplan").symlink_to(ROOT, target_is_directory=True)
    out = subprocess.run([sys.executable, "-c", "import hexplan, hexplan.solver; print(hexplan.load_cluster.__name__)"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "load_cluster", out.stderr


def test_import_hexplan_and_the_gateway_leave_the_simulator_alone():
    code = ("import sys, hexplan\n"
            "mods = lambda: sorted(m for m in sys.modules if m.startswith('hexplan.simulator'))\n"
            "first = mods()\n"
            "try:\n"
            "    import hexplan.executor.gateway\n"
            "except ImportError:\n"
            "    pass\n"
            "print(first, mods(), hexplan.simulate.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[] [] "), out.stdout   # none after import hexplan, nor after the gateway
    assert out.stdout.strip().endswith("hexplan.simulator.run")    # and it loads on first use


# ---- stdout is for results ------------------------------------------------------------

def test_native_writes_to_stdout_are_silenced_inside_solver_calls(capfd):
    from hexplan.solver.milp import native_stdout_silenced

    libc = ctypes.CDLL(None)
    print("before", flush=True)
    with native_stdout_silenced():
        os.write(1, b"Running HiGHS 9.9.9 (banner written straight to fd 1)\n")
        libc.printf(b"buffered in C stdio, flushed only later\n")
    print("after", flush=True)
    libc.fflush(None)
    out, _ = capfd.readouterr()
    assert out == "before\nafter\n"


def _json_stdout(args, tmp_path):
    out = subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)   # the whole of stdout is one document


def test_stdout_is_pure_json_for_solve_compare_and_simulate(tmp_path):
    cluster = str(ROOT / "cluster_specs" / "hexgen-case.yaml")
    plan = _json_stdout(["solve", cluster, "--model", "llama-2-70b", "--time-limit", "5", "--format", "json",
                         "-o", "-"], tmp_path)
    assert plan["model"] == "llama-2-70b" and plan["solver"]["backend"] == "highs"
    (tmp_path / "p.json").write_text(json.dumps(plan))
    rows = _json_stdout(["compare", cluster, "--model", "llama-2-70b", "--time-limit", "5", "--planners",
                         "hexplan,homogeneous", "--rate", "0.5", "--duration", "60", "--json"], tmp_path)
    assert [r["planner"] for r in rows][:1] == ["hexplan"]
    sim = _json_stdout(["simulate", "p.json", "--cluster", cluster, "--rate", "0.5", "--duration", "60", "--json"],
                       tmp_path)
    assert sim["requests_completed"] > 0


def test_yaml_to_stdout_parses(tmp_path):
    import yaml

    out = subprocess.run(CLI + ["solve", str(ROOT / "cluster_specs" / "hexgen-case.yaml"), "--model", "llama-2-70b",
                                "--time-limit", "5", "-o", "-"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"] == "llama-2-70b"


# ---- CI runs the README's command -----------------------------------------------------

def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.count("\n") == 0, "the README's test command is one line"
    assert test_cmd in ci.splitlines(), f"{test_cmd!r} is not a line of .ci/run"
    solve_cmd = blocks[0]
    assert "hexplan solve" in solve_cmd and "pip install" in solve_cmd


# ---- a wheel, run from the source root --------------------------------------------------

def _wheel_venv(tmp_path) -> Path:
    """A venv holding hexplan as a built wheel and this environment's other packages, but not the
    editable install: the outer site-packages is reached through a .pth line, whose own .pth files
    (the editable hexplan's among them) Python does not read."""
    pytest.importorskip("hatchling", reason="building the wheel offline needs hatchling (the [dev] extra)")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("hexplan-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer-env.pth").write_text("\n".join(sorted(outer)) + "\n")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return py


def test_a_wheel_works_from_the_source_root_and_elsewhere(tmp_path):
    py = _wheel_venv(tmp_path)
    code = "import hexplan.solver, hexplan.executor, hexplan; print(hexplan.solver.__file__); print(hexplan.load_cluster)"
    elsewhere = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "site-packages" in elsewhere.stdout.splitlines()[0]     # the wheel alone is complete
    at_root = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert at_root.returncode == 0, at_root.stderr                 # the checkout's hexplan/ shadows it,
    assert at_root.stdout.splitlines()[0] == str(ROOT / "solver" / "hexplan" / "solver" / "__init__.py")


def test_launch_from_the_source_root_with_a_wheel_install(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("grpc")
    pytest.importorskip("transformers")
    from executor_util import free_port, hf_greedy, make_checkpoint

    py = _wheel_venv(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=2, vocab=128)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n      - {{node: a, gpus: [0], tp: 1, layers: [0, 1]}}\n"
                    "      - {node: b, gpus: [0], tp: 1, layers: [1, 2]}\n")
    port, err = free_port(), tmp_path / "launch.err"
    proc = subprocess.Popen([str(py), "-m", "hexplan.cli", "launch", str(plan), "--checkpoint", ckpt,
                             "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=err.open("w"), text=True)
    try:
        line = proc.stdout.readline()                  # "hexplan: ready: ...", or EOF if it failed
        assert line.startswith("hexplan: ready"), line + err.read_text()
        out = subprocess.run([str(py), "-m", "hexplan.cli", "generate", "--target", f"127.0.0.1:{port}",
                              "--token-ids", "5,17,33", "--max-new-tokens", "4", "--json"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["token_ids"] == hf_greedy(ckpt, [5, 17, 33], 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()

