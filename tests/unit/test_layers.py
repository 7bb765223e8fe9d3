"""The architecture, enforced: layers import one way (docs/architecture.md, "Layers").

    common (+ gen)    the generic foundation: spec, plan, channel, gRPC, errors
    planner           the allocation optimiser (CVXPY), pure
    policy            decision rules shared by the services and the simulator
    controller        control plane
    worker, router    data plane (neither imports the other, nor the planner)
    ocr               the OCR application: processors, pages, CER (a plugin)
    sim, loadgen, tools   offline and operator tools: may use everything above
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"

LAYER_OF = {
    "common": "common", "gen": "common", "planner": "planner", "policy": "policy",
    "controller": "control", "worker": "worker", "router": "router", "ocr": "app", "echo": "app",
    "sim": "tools", "loadgen": "tools", "tools": "tools",
}
ALLOWED = {
    "common": {"common"},
    "planner": {"common", "planner"},
    "policy": {"common", "planner", "policy"},
    "control": {"common", "planner", "policy", "control"},
    "worker": {"common", "policy", "worker"},
    "router": {"common", "policy", "router"},
    "app": {"common", "app"},
    "tools": {"common", "planner", "policy", "control", "worker", "router", "app", "tools"},
}


def imports(path: Path):
    """(line, imported module, imported names) for every import in a file, nested ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, tuple(a.name for a in node.names)


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "services" else None


def test_every_package_has_a_layer():
    pkgs = {p.name for p in SERVICES.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs <= set(LAYER_OF), pkgs - set(LAYER_OF)
    assert not [p for p in SERVICES.glob("*.py") if p.name != "__init__.py"], "modules belong in a layer's package"


def test_imports_point_one_way():
    bad = []
    for path in SERVICES.rglob("*.py"):
        rel = path.relative_to(SERVICES)
        if rel.parts[0] == "gen" or len(rel.parts) < 2:
            continue
        mine = LAYER_OF[rel.parts[0]]
        for line, module, names in imports(path):
            pkg = package_of(module)
            targets = [pkg] if pkg else []
            if module == "services":          # from services import common, ...
                targets = list(names)
            for t in targets:
                if t in LAYER_OF and LAYER_OF[t] not in ALLOWED[mine]:
                    bad.append(f"{rel}:{line} ({mine}) imports {module} ({LAYER_OF[t]})")
    assert not bad, "\n".join(bad)


def test_the_simulator_imports_no_private_names_from_other_packages():
    bad = []
    for path in (SERVICES / "sim").rglob("*.py"):
        for line, module, names in imports(path):
            if package_of(module) not in (None, "sim"):
                bad += [f"sim/{path.name}:{line} {module}.{n}" for n in names if n.startswith("_")]
    assert not bad, bad


def test_the_data_plane_loads_neither_cvxpy_nor_the_ocr_application():
    """Workers and routers import the light policy modules only; the OCR processors are
    loaded at run time from the spec's plugins."""
    code = ("import sys, services.worker.main, services.router.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cvxpy' or m.startswith('services.ocr')"
            " or m.startswith('services.planner') or m.startswith('services.controller')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
