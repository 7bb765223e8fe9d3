"""Generate the gRPC/protobuf modules from proto/ into services/gen/ (make proto).

grpc_tools emits absolute imports (``import inference_pb2``); they are rewritten to
package-relative imports so the generated modules work as ``services.gen.*``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services" / "gen"


def main() -> int:
    protos = sorted(str(p.name) for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        print(f"no .proto files in {PROTO_DIR}", file=sys.stderr)
        return 1
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    for path in [*OUT_DIR.glob("*_pb2*.py"), *OUT_DIR.glob("*_pb2.pyi")]:
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    print(f"generated {len(protos)} proto file(s) into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
