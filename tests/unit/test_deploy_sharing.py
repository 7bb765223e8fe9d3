"""How many workers go on one GPU: the compose file, the Kubernetes manifests and the
planner's reading of it (services/planner/sharing.py) agree."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from services.planner.sharing import WORKERS_PER_GPU_ENV, workers_per_device_from_env
from tests.unit.test_deploy import SERVICES, _ours
from tests.unit.test_k8s import objects, render

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "gpu-sharing"


def _default(value: str) -> str:
    """The default of a compose ``${VAR:-default}``."""
    m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
    assert m, f"not a ${{VAR:-default}}: {value!r}"
    return m.group(2)


def test_compose_states_workers_per_gpu_and_its_device_ids_agree():
    per_gpu = {name: int(_default(SERVICES[name]["environment"][WORKERS_PER_GPU_ENV]))
               for name, argv in _ours().items()}
    assert set(per_gpu.values()) == {3}
    on_gpu: dict[str, int] = {}
    for name, argv in _ours().items():
        if argv[0] != "pipeserve-worker":
            continue
        (dev,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        (gpu,) = dev["device_ids"]
        on_gpu[_default(gpu)] = on_gpu.get(_default(gpu), 0) + 1
    assert max(on_gpu.values()) <= 3          # no GPU holds more workers than it says


def _env(name: str) -> dict[str, str]:
    (cm,) = [o for n, o in objects(name, "ConfigMap").items() if n.startswith("pipeserve-env")]
    return cm["data"]


def test_k8s_base_gives_each_worker_a_gpu_and_says_so():
    assert _env("base")[WORKERS_PER_GPU_ENV] == "1"
    (worker,) = [d for n, d in objects("base", "Deployment").items() if n == "worker"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_gpu_sharing_overlay_matches_the_time_slicing_replicas():
    env = _env(str(OVERLAY.relative_to(ROOT / "deploy" / "k8s")))
    config = yaml.safe_load(yaml.safe_load((OVERLAY / "time-slicing.yaml").read_text())["data"]["any"])
    (res,) = config["sharing"]["timeSlicing"]["resources"]
    assert res["name"] == "nvidia.com/gpu"
    assert int(env[WORKERS_PER_GPU_ENV]) == res["replicas"] == 3
    assert render("overlays/gpu-sharing")    # renders with the real kubectl kustomize


def test_workers_per_device_from_env():
    assert workers_per_device_from_env({}) is None
    assert workers_per_device_from_env({WORKERS_PER_GPU_ENV: " "}) is None
    assert workers_per_device_from_env({WORKERS_PER_GPU_ENV: "3"}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=WORKERS_PER_GPU_ENV):
            workers_per_device_from_env({WORKERS_PER_GPU_ENV: bad})
