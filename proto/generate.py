"""Regenerate the checked-in gRPC code from proto/hexplan_v1.proto.

    python proto/generate.py          # writes executor/hexplan/executor/_proto/hexplan_v1_pb2*.py
    python proto/generate.py --check  # exit 1 if the checked-in code is stale

Needs grpcio-tools (the [dev] extra). The generated grpc module imports its message module
with a top-level import; it is rewritten to a relative one so it lives inside the package.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "executor" / "hexplan" / "executor" / "_proto"
FILES = ("hexplan_v1_pb2.py", "hexplan_v1_pb2.pyi", "hexplan_v1_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(ROOT / "proto" / "hexplan_v1.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_file = out / "hexplan_v1_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import hexplan_v1_pb2 as", "from . import hexplan_v1_pb2 as"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the checked-in files")
    args = ap.parse_args()
    if not args.check:
        generate(OUT)
        (OUT / "__init__.py").write_text('"""Generated from proto/hexplan_v1.proto by proto/generate.py."""\n')
        print(f"wrote {', '.join(FILES)} to {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [f for f in FILES if (Path(tmp) / f).read_text() != (OUT / f).read_text()]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python proto/generate.py", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
