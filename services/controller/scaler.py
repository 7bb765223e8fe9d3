"""Scale the Kubernetes Deployment of pool workers to what the plan uses, plus a spare.

A pool worker the plan does not use is *parked*: it holds no model but still holds its
pod, its GPU request and so a GPU node. With ``--k8s-scale-deployment`` the controller
returns that capacity to the cluster: after each reconcile it sets the worker
Deployment's ``replicas`` to the pool workers the plan uses plus ``spare`` (the spare
absorbs growth at once: when the plan takes it, the target grows and a new spare pod
starts), bounded by ``min``/``max`` and never below the pool workers in use.

Up at once, down with hysteresis: the target must stay below the current replica count
for ``down_cooldown_s`` before the Deployment shrinks, and then only to the highest
target seen in that window, so a plan that flaps between N and N-1 workers does not make
pods come and go. Before shrinking, the pods of the workers in use get a high
``controller.kubernetes.io/pod-deletion-cost`` and parked ones 0, so the ReplicaSet
removes parked ones first (a pool worker's id is its pod name in deploy/k8s).

``decide`` is pure (unit-tested); ``KubeScaleApi`` is the small adapter around the
``kubernetes`` client (the optional ``k8s`` extra, imported only when scaling is on).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from services.common.logging import get_logger
from services.common.plan import RegisteredWorker

log = get_logger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
ACTIVE_COST = 1000   # the deletion cost of a worker in use; parked ones get 0
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class ScalePolicy:
    spare: int = 1
    min_replicas: int = 1
    max_replicas: int = 8
    down_cooldown_s: float = 120.0

    def __post_init__(self) -> None:
        if self.spare < 0:
            raise ValueError(f"spare must be >= 0, not {self.spare}")
        if self.min_replicas < 0:
            raise ValueError(f"min replicas must be >= 0, not {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"max replicas ({self.max_replicas}) must be >= min ({self.min_replicas}) and >= 1")
        if self.down_cooldown_s < 0:
            raise ValueError(f"down cooldown must be >= 0 s, not {self.down_cooldown_s}")


@dataclass
class ScaleState:
    """What the hysteresis remembers between decisions."""
    below_since: float | None = None   # the target has been below the replicas since then
    below_peak: int = 0                # the highest target since then


@dataclass(frozen=True)
class Decision:
    replicas: int          # what the Deployment should have (== current: leave it)
    target: int            # the instantaneous target, before the hysteresis
    reason: str


def target_replicas(active: int, policy: ScalePolicy) -> int:
    """Pool workers in use plus the spare, within [min, max], never below ``active``."""
    if active < 0:
        raise ValueError(f"active workers must be >= 0, not {active}")
    bounded = min(policy.max_replicas, max(policy.min_replicas, active + policy.spare))
    return max(bounded, active)


def decide(active: int, current: int, now: float, policy: ScalePolicy, state: ScaleState) -> Decision:
    """The replica count for the worker Deployment. ``active``: pool workers the plan in
    force uses; ``current``: the Deployment's replicas now; ``state`` is updated."""
    if current < 0:
        raise ValueError(f"current replicas must be >= 0, not {current}")
    target = target_replicas(active, policy)
    if target >= current:
        state.below_since = None
        reason = "up" if target > current else "steady"
        return Decision(target, target, reason)
    if state.below_since is None:
        state.below_since, state.below_peak = now, target
    else:
        state.below_peak = max(state.below_peak, target)
    if now - state.below_since < policy.down_cooldown_s:
        return Decision(current, target, "cooldown")
    replicas = state.below_peak
    state.below_since = None
    return Decision(replicas, target, "down")


class ScaleApi(Protocol):
    """The calls the scaler makes; ``KubeScaleApi`` or a test's fake."""

    def get_replicas(self) -> int: ...

    def set_replicas(self, replicas: int) -> None: ...

    def set_deletion_costs(self, costs: dict[str, int]) -> None: ...


class ScalerUnavailable(RuntimeError):
    """Scaling was asked for but cannot start (no client, no cluster credentials)."""


class KubeScaleApi:
    """The Deployment's scale subresource (and its pods' deletion cost) through the
    ``kubernetes`` client. RBAC: deploy/k8s/base/rbac.yaml."""

    def __init__(self, deployment: str, namespace: str | None = None, apps: Any = None, core: Any = None) -> None:
        if apps is None or core is None:
            try:
                from kubernetes import client, config
            except ImportError as exc:   # the optional extra
                raise ScalerUnavailable("--k8s-scale-deployment needs the kubernetes client: "
                                        "pip install 'pipeserve[k8s]'") from exc
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()   # outside a cluster: ~/.kube/config
                except (config.ConfigException, OSError) as exc:
                    raise ScalerUnavailable(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from exc
            apps = apps or client.AppsV1Api()
            core = core or client.CoreV1Api()
        self.deployment = deployment
        self.namespace = namespace or in_cluster_namespace()
        self.apps = apps
        self.core = core

    def get_replicas(self) -> int:
        scale = self.apps.read_namespaced_deployment_scale(self.deployment, self.namespace)
        return int(scale.spec.replicas or 0)

    def set_replicas(self, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(self.deployment, self.namespace,
                                                    {"spec": {"replicas": int(replicas)}})

    def set_deletion_costs(self, costs: dict[str, int]) -> None:
        """Best effort, pod by pod: a pod that is gone (or a worker id that is no pod name)
        only makes the ReplicaSet's choice less informed; the scaling still happens."""
        for pod, cost in sorted(costs.items()):
            try:
                self.core.patch_namespaced_pod(pod, self.namespace,
                                               {"metadata": {"annotations": {DELETION_COST: str(int(cost))}}})
            except Exception as exc:
                log.warning("pod_deletion_cost_failed", pod=pod, error=str(exc))


def in_cluster_namespace() -> str:
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError:
        raise ScalerUnavailable(f"no --k8s-namespace and not in a cluster ({NAMESPACE_FILE} unreadable)") from None


class DeploymentScaler:
    """Called after every reconcile: reads the replicas, decides, patches when it changes.
    Errors are logged and retried at the next call; the control loop never stops for them."""

    def __init__(self, api: ScaleApi, policy: ScalePolicy, min_interval_s: float = 5.0) -> None:
        self.api = api
        self.policy = policy
        self.state = ScaleState()
        self.min_interval_s = min_interval_s
        self._next = float("-inf")
        self._failing = False
        self.last: Decision | None = None

    def step(self, active_pool: list[str], now: float, parked_pool: Iterable[str] = ()) -> Decision | None:
        """``active_pool``: ids of the pool workers the plan in force uses (= pod names);
        ``parked_pool``: the registered pool workers it does not use."""
        if now < self._next:
            return None
        self._next = now + self.min_interval_s
        try:
            current = self.api.get_replicas()
            decision = decide(len(active_pool), current, now, self.policy, self.state)
            if decision.replicas != current:
                if decision.replicas < current:   # the ReplicaSet removes parked pods first
                    costs = {w: 0 for w in parked_pool}
                    costs.update({w: ACTIVE_COST for w in active_pool})
                    self.api.set_deletion_costs(costs)
                self.api.set_replicas(decision.replicas)
                log.info("workers_scaled", replicas_from=current, replicas_to=decision.replicas,
                         active=len(active_pool), reason=decision.reason)
            if self._failing:
                log.info("worker_scaling_recovered")
            self._failing = False
        except Exception as exc:   # API server away, RBAC missing: log once, retry
            if not self._failing:
                log.warning("worker_scaling_failed", error=str(exc))
            self._failing = True
            return None
        self.last = decision
        return decision


def split_pool(plan_workers: Iterable[str], registered: Iterable[RegisteredWorker]) -> tuple[list[str], list[str]]:
    """The registered pool workers (no task) the plan uses, and those it parks."""
    used = set(plan_workers)
    pool = sorted(w.worker_id for w in registered if not w.task)
    return [w for w in pool if w in used], [w for w in pool if w not in used]
