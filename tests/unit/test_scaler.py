"""The controller's worker Deployment scaler (services/controller/scaler.py): its decisions,
and the adapter against a hand-written fake of the Kubernetes API's calls."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from services.controller.main import parse_config
from services.controller.scaler import (DELETION_COST, DeploymentScaler, KubeScaleApi, ScalePolicy, ScalerUnavailable,
                                        ScaleState, decide, split_pool, target_replicas)

POLICY = ScalePolicy(spare=1, min_replicas=1, max_replicas=6, down_cooldown_s=60.0)


@pytest.mark.parametrize("active,expected", [
    (0, 1),   # nothing in use: min (= the spare)
    (2, 3),   # in use + spare
    (5, 6),
    (6, 6),   # capped at max ...
    (9, 9),   # ... but never below the workers in use
])
def test_target_is_active_plus_spare_within_bounds(active, expected):
    assert target_replicas(active, POLICY) == expected


def test_min_holds_capacity_when_idle():
    assert target_replicas(0, ScalePolicy(spare=1, min_replicas=3, max_replicas=6)) == 3
    assert target_replicas(0, ScalePolicy(spare=0, min_replicas=0, max_replicas=6)) == 0


def test_scale_up_is_immediate():
    state = ScaleState()
    d = decide(active=3, current=3, now=0.0, policy=POLICY, state=state)   # the spare was taken
    assert (d.replicas, d.reason) == (4, "up")


def test_scale_down_waits_for_the_cooldown_then_takes_the_window_s_peak():
    state = ScaleState()
    assert decide(1, 5, 0.0, POLICY, state).replicas == 5          # target 2: wait
    assert decide(3, 5, 30.0, POLICY, state).replicas == 5         # target 4 within the window
    assert decide(1, 5, 59.0, POLICY, state).reason == "cooldown"
    d = decide(1, 5, 60.0, POLICY, state)
    assert (d.replicas, d.target, d.reason) == (4, 2, "down")      # the peak, not the last target
    assert state.below_since is None


def test_a_flapping_plan_does_not_make_pods_come_and_go():
    state, current = ScaleState(), 4
    for i in range(20):   # the plan alternates between 3 and 2 workers every 10 s
        d = decide(3 if i % 2 else 2, current, i * 10.0, POLICY, state)
        current = d.replicas
        assert current >= 4 - 1
    assert current == 4   # target 3 or 4 in every 60 s window: the peak (4) holds


def test_a_rise_during_the_cooldown_restarts_it():
    state = ScaleState()
    decide(1, 4, 0.0, POLICY, state)
    assert decide(3, 4, 50.0, POLICY, state).reason == "steady"    # target 4 == current
    assert decide(1, 4, 70.0, POLICY, state).reason == "cooldown"  # a new window from 70 s
    assert decide(1, 4, 130.0, POLICY, state).replicas == 2


def test_never_below_the_workers_in_use_even_after_the_cooldown():
    policy = ScalePolicy(spare=0, min_replicas=0, max_replicas=2, down_cooldown_s=0.0)
    assert decide(3, 5, 0.0, policy, ScaleState()).replicas == 3


@pytest.mark.parametrize("kwargs", [dict(spare=-1), dict(min_replicas=-1), dict(min_replicas=4, max_replicas=3),
                                    dict(min_replicas=0, max_replicas=0), dict(down_cooldown_s=-1.0)])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        ScalePolicy(**kwargs)


def test_bad_flags_are_refused_by_the_controller_s_parser(capsys):
    base = ["--spec", "pipelines/ocr.yaml", "--plan-file", "plans/ocr-demo.yaml"]
    with pytest.raises(SystemExit):
        parse_config(base + ["--k8s-scale-deployment", "worker", "--k8s-min", "5", "--k8s-max", "2"])
    assert "--k8s-*" in capsys.readouterr().err
    cfg = parse_config(base + ["--k8s-scale-deployment", "worker", "--k8s-spare", "2"])
    assert cfg.k8s_deployment == "worker" and cfg.k8s_policy.spare == 2
    assert parse_config(base).k8s_policy is None   # off by default


class FakeAppsV1:
    """The two AppsV1Api calls the scaler makes, on one Deployment's scale."""

    def __init__(self, replicas: int, fail: bool = False) -> None:
        self.replicas = replicas
        self.fail = fail
        self.patches: list[tuple[str, str, dict]] = []

    def read_namespaced_deployment_scale(self, name, namespace):
        if self.fail:
            raise ConnectionError("API server unreachable")
        return SimpleNamespace(spec=SimpleNamespace(replicas=self.replicas))

    def patch_namespaced_deployment_scale(self, name, namespace, body):
        self.patches.append((name, namespace, body))
        self.replicas = body["spec"]["replicas"]


class FakeCoreV1:
    def __init__(self) -> None:
        self.annotations: dict[str, dict] = {}

    def patch_namespaced_pod(self, name, namespace, body):
        self.annotations.setdefault(name, {}).update(body["metadata"]["annotations"])


def _scaler(replicas, policy=POLICY, fail=False):
    apps, core = FakeAppsV1(replicas, fail), FakeCoreV1()
    api = KubeScaleApi("worker", "pipeserve", apps=apps, core=core)
    return DeploymentScaler(api, policy, min_interval_s=5.0), apps, core


def test_scaler_patches_the_scale_subresource_of_its_deployment():
    scaler, apps, _ = _scaler(3)
    d = scaler.step(["worker-a", "worker-b", "worker-c"], now=0.0)
    assert d.replicas == 4
    assert apps.patches == [("worker", "pipeserve", {"spec": {"replicas": 4}})]


def test_scaler_leaves_a_steady_deployment_alone_and_rate_limits_itself():
    scaler, apps, _ = _scaler(3)
    assert scaler.step(["a", "b"], now=0.0).reason == "steady"
    assert scaler.step(["a", "b", "c"], now=1.0) is None   # within min_interval_s: no call
    assert apps.patches == []


def test_scale_down_protects_the_workers_in_use_and_exposes_the_parked_ones():
    scaler, apps, core = _scaler(5)
    active, parked = ["w-1", "w-2"], ["w-3", "w-4", "w-5"]
    assert scaler.step(active, 0.0, parked).reason == "cooldown"
    assert core.annotations == {} and apps.patches == []
    d = scaler.step(active, 60.0, parked)
    assert d.replicas == 3 and apps.replicas == 3
    assert {p: a[DELETION_COST] for p, a in core.annotations.items()} == {
        "w-1": "1000", "w-2": "1000", "w-3": "0", "w-4": "0", "w-5": "0"}


def test_a_pod_that_is_gone_does_not_stop_the_scale_down():
    scaler, apps, core = _scaler(4, ScalePolicy(spare=1, min_replicas=1, max_replicas=6, down_cooldown_s=0.0))

    def patch(name, namespace, body):
        if name == "gone":
            raise LookupError("pods \"gone\" not found")
        core.annotations[name] = body["metadata"]["annotations"]

    core.patch_namespaced_pod = patch
    assert scaler.step(["w-1"], 0.0, ["gone", "w-2"]).replicas == 2 and apps.replicas == 2
    assert core.annotations == {"w-1": {DELETION_COST: "1000"}, "w-2": {DELETION_COST: "0"}}


def test_scaler_survives_api_errors_and_recovers():
    scaler, apps, _ = _scaler(2, fail=True)
    assert scaler.step(["a", "b"], 0.0) is None
    apps.fail = False
    assert scaler.step(["a", "b"], 10.0).replicas == 3


def test_the_scaler_counts_the_pool_workers_a_real_plan_uses():
    """A ControllerCore with the demo plan (det x1, rec x1) and three pool workers: the
    plan uses two and parks one, so the Deployment stays at 3 (2 + the spare); a
    task-bound worker outside the pool counts for neither."""
    import asyncio

    from services.common.plan import RegisteredWorker
    from services.common.spec import load_spec
    from services.controller.core import ControllerCore
    from services.controller.registry import WorkerRegistry

    published = []

    async def publish(plan):
        published.append(plan.with_version(len(published) + 1))
        return published[-1]

    root = Path(__file__).resolve().parents[2]
    core = ControllerCore(load_spec(root / "pipelines" / "ocr.yaml"), WorkerRegistry(), publish,
                          plan_file=root / "plans" / "ocr-demo.yaml")
    for i in range(3):
        core.registry.register(f"worker-{i}", f"10.0.0.{i}:50061", "", [])
    asyncio.run(core.reconcile())
    assert published, "no plan published"
    active, parked = split_pool(core.current.workers, core.registry.live())
    assert len(active) == 2 and len(parked) == 1 and set(active) <= set(core.current.workers)
    scaler, apps, _ = _scaler(3)
    assert scaler.step(active, 0.0, parked).replicas == 3 and apps.patches == []
    assert split_pool({"det-0": 1}, [RegisteredWorker("det-0", "h:1", "det")]) == ([], [])


def test_without_the_kubernetes_client_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kubernetes", None)   # import kubernetes -> ImportError
    with pytest.raises(ScalerUnavailable, match=r"pip install 'pipeserve\[k8s\]'"):
        KubeScaleApi("worker", "pipeserve")


def test_without_a_cluster_or_kubeconfig_the_error_says_so(monkeypatch, tmp_path):
    pytest.importorskip("kubernetes")   # the k8s extra (in dev too)
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.kube/config
    with pytest.raises(ScalerUnavailable, match="no Kubernetes credentials"):
        KubeScaleApi("worker", "pipeserve")


def test_without_a_namespace_outside_a_cluster_the_error_says_so(monkeypatch, tmp_path):
    from services.controller import scaler

    monkeypatch.setattr(scaler, "NAMESPACE_FILE", tmp_path / "absent")
    with pytest.raises(ScalerUnavailable, match="--k8s-namespace"):
        KubeScaleApi("worker", None, apps=FakeAppsV1(1), core=FakeCoreV1())
