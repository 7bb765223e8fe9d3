"""Write the echo pipeline's model: an ONNX graph with one Identity node on a ``uint8``
vector of any length (input ``x``, output ``y``).

    python -m services.echo.model --out models/echo/identity.onnx

Needs the ``onnx`` package (the project's ``dev`` extra). ``make models`` runs it with
``--skip-without-onnx``: an install without the dev extra (the GPU image) skips the file,
saying so, instead of failing; only the tests and benchmarks use it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path("models/echo/identity.onnx")


def build_identity_model():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="echo")], "echo", [x], [y])
    model = helper.make_model(graph, producer_name="pipeserve-echo",
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8          # readable by every ONNX Runtime the project supports (>= 1.17)
    onnx.checker.check_model(model)
    return model


def write_identity_model(out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = build_identity_model().SerializeToString()
    if not (out.is_file() and out.read_bytes() == data):
        out.write_bytes(data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.echo.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write it (default: %(default)s)")
    p.add_argument("--skip-without-onnx", action="store_true",
                   help="without the onnx package, say so and exit 0 instead of failing")
    a = p.parse_args(argv)
    try:
        path = write_identity_model(a.out)
    except ImportError:
        if a.skip_without_onnx:
            print(f"skipped {a.out}: the onnx package (the dev extra) is not installed")
            return 0
        print("error: the onnx package is needed (pip install -e '.[dev]')", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
