"""deploy/: the compose file and Dockerfile agree with the code they run.

Docker cannot run here, so these checks read the files: every command is a console
script from pyproject.toml, every flag parses with that CLI's own ``build_parser()``,
and every address points at a service that listens on that port.
"""
from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the tomli backport (dev extra)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _scripts() -> dict[str, str]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return doc["project"]["scripts"]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


SERVICES = _compose()["services"]


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _ours() -> dict[str, list[str]]:
    """Services running a pipeserve console script -> their argv."""
    return {name: _command(svc) for name, svc in SERVICES.items()
            if _command(svc) and _command(svc)[0].startswith("pipeserve-")}


def _flag(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _listens(name: str) -> set[int]:
    """Container ports a service declares (expose, or the container side of ports)."""
    svc = SERVICES[name]
    ports = {int(str(p)) for p in svc.get("expose", [])}
    for p in svc.get("ports", []):
        ports.add(int(str(p).split(":")[-1].split("/")[0]))
    return ports


def _split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def test_compose_parses_and_has_the_topology():
    ours = _ours()
    workers = [argv for argv in ours.values() if argv[0] == "pipeserve-worker"]
    assert len(workers) == 3 and not [a for a in workers if "--task" in a]  # 3 pool workers
    routers = sorted(_flag(argv, "--task")[0] for argv in ours.values()
                     if argv[0] == "pipeserve-router")
    assert routers == ["det", "rec"]
    assert sum(argv[0] == "pipeserve-controller" for argv in ours.values()) == 1
    assert "redis" in SERVICES


@pytest.mark.parametrize("name", sorted(_ours()))
def test_every_command_is_a_declared_console_script(name):
    script = _ours()[name][0]
    assert script in _scripts(), f"{name}: {script} is not in [project.scripts]"


@pytest.mark.parametrize("name", sorted(_ours()))
def test_every_flag_parses_with_the_cli_s_own_parser(name):
    argv = _ours()[name]
    module_name = _scripts()[argv[0]].split(":")[0]
    module = importlib.import_module(module_name)
    parser = module.build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = [a for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{name}: {argv[0]} has no flags {unknown}"
    parser.parse_args(argv[1:])  # values and required flags too (SystemExit on error)


@pytest.mark.parametrize("name", sorted(_ours()))
def test_servers_bind_all_interfaces_and_declare_their_port(name):
    argv = _ours()[name]
    if argv[0] == "pipeserve-loadgen":
        return
    assert _flag(argv, "--host") == ["0.0.0.0"], f"{name} must bind 0.0.0.0 in a container"
    (port,) = _flag(argv, "--port")
    assert int(port) in _listens(name), f"{name}: --port {port} not in expose/ports"


def test_addresses_point_at_listening_services():
    checked = 0
    for name, argv in _ours().items():
        addresses = (_flag(argv, "--controller") + _flag(argv, "--target")
                     + [c.split("=", 1)[1] for c in _flag(argv, "--child")])
        env_url = (SERVICES[name].get("environment") or {}).get("REDIS_URL")
        assert not _flag(argv, "--redis-url"), f"{name}: Redis's URL belongs in $REDIS_URL"
        for url in [env_url] if env_url else []:
            m = re.fullmatch(r"redis://([^:/]+):(\d+)(/\d+)?", url)
            assert m, f"{name}: bad --redis-url {url}"
            addresses.append(f"{m.group(1)}:{m.group(2)}")
        for addr in addresses:
            host, port = _split_addr(addr)
            assert host in SERVICES, f"{name}: {addr}: no service {host}"
            assert port in _listens(host), f"{name}: {addr}: {host} does not listen on {port}"
            own = _ours().get(host)
            if own is not None and _flag(own, "--port"):
                assert int(_flag(own, "--port")[0]) == port, f"{name}: {addr} vs {host}'s --port"
            checked += 1
    assert checked >= 10


def test_workers_advertise_themselves_and_have_unique_ids():
    workers = {n: a for n, a in _ours().items() if a[0] == "pipeserve-worker"}
    ids = [_flag(a, "--worker-id")[0] for a in workers.values()]
    assert len(set(ids)) == len(ids) == 3
    for name, argv in workers.items():
        host, port = _split_addr(_flag(argv, "--advertise")[0])
        assert host == name and port == int(_flag(argv, "--port")[0])


def test_workers_reserve_an_nvidia_gpu():
    for name, argv in _ours().items():
        if argv[0] != "pipeserve-worker":
            continue
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name


def test_front_door_is_the_det_router_on_8001():
    (front,) = [n for n, a in _ours().items()
                if a[0] == "pipeserve-router" and _flag(a, "--task") == ["det"]]
    assert "8001:8001" in [str(p) for p in SERVICES[front]["ports"]]
    assert _flag(_ours()[front], "--child") == ["rec=router-rec:50071"]
    # Only the front door is published on the host's network; Grafana on its loopback only.
    assert [n for n, s in SERVICES.items() if s.get("ports")] == [front, "grafana"]
    assert [str(p) for p in SERVICES["grafana"]["ports"]] == ["127.0.0.1:3000:3000"]


def test_same_spec_and_plan_as_the_demo():
    for name, argv in _ours().items():
        for spec in _flag(argv, "--spec"):
            assert (ROOT / spec).is_file(), f"{name}: {spec} missing"
        for plan in _flag(argv, "--plan-file"):
            assert (ROOT / plan).is_file(), f"{name}: {plan} missing"


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-cudnn-runtime-\S+$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert 'pip install -e ".[gpu,k8s]"' in text and "onnxruntime " not in text
    assert re.search(r"^RUN make proto models", text, re.M)
    # make models writes the uint8 twins with onnx (services/ocr/fold.py): every line installs it
    installs = re.findall(r'pip install -e "\.\[gpu[^"]*\]"[^;]*;;', text)
    assert len(installs) == 2 and all('"onnx>=' in line for line in installs), installs
    # Everything COPY'd exists (the build would fail otherwise).
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src.rstrip("/")).exists(), f"COPY source {src} missing"
    # The stamp the Dockerfile touches is the Makefile's venv stamp.
    assert "touch .venv/.installed" in text
    assert "$(VENV)/.installed:" in (ROOT / "Makefile").read_text()
    # Every referenced top-level directory used by compose commands is in the image.
    copied = set(re.findall(r"^COPY (\S+)/ ", text, re.M))
    for argv in _ours().values():
        for flag in ("--spec", "--plan-file"):
            for value in _flag(argv, flag):
                assert value.split("/")[0] in copied
