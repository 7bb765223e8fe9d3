"""The scaler's adapter through the real ``kubernetes`` client, over real HTTP, against a
small stand-in for the API server's three endpoints it uses: the paths, verbs, patch
content type and bodies the client sends, and the Scale it parses. (No cluster here;
RBAC and the ReplicaSet's choice of pods are not exercised.)"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.controller.scaler import DELETION_COST, DeploymentScaler, KubeScaleApi, ScalePolicy

kubernetes = pytest.importorskip("kubernetes")   # the k8s extra (in dev too)

SCALE_PATH = "/apis/apps/v1/namespaces/pipeserve/deployments/worker/scale"
POD_PATH = "/api/v1/namespaces/pipeserve/pods/"


class FakeApiServer(BaseHTTPRequestHandler):
    replicas = 5
    requests: list[tuple[str, str, str, dict | None]] = []

    def log_message(self, *args):   # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _scale(self) -> dict:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": "worker", "namespace": "pipeserve"},
                "spec": {"replicas": type(self).replicas}, "status": {"replicas": type(self).replicas}}

    def do_GET(self):
        type(self).requests.append(("GET", self.path, "", None))
        if self.path == SCALE_PATH:
            return self._reply(200, self._scale())
        return self._reply(404, {"kind": "Status", "code": 404})

    def do_PATCH(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(("PATCH", self.path, self.headers["Content-Type"], body))
        if self.path == SCALE_PATH:
            type(self).replicas = body["spec"]["replicas"]
            return self._reply(200, self._scale())
        if self.path.startswith(POD_PATH):
            return self._reply(200, {"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {"name": self.path[len(POD_PATH):], **body["metadata"]}})
        return self._reply(404, {"kind": "Status", "code": 404})


@pytest.fixture
def api_server():
    FakeApiServer.replicas, FakeApiServer.requests = 5, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_the_real_client_reads_patches_and_annotates_as_the_fake_assumes(api_server):
    from kubernetes import client

    cfg = client.Configuration(host=api_server)
    api_client = client.ApiClient(cfg)
    api = KubeScaleApi("worker", "pipeserve", apps=client.AppsV1Api(api_client), core=client.CoreV1Api(api_client))
    assert api.get_replicas() == 5
    scaler = DeploymentScaler(api, ScalePolicy(spare=1, min_replicas=1, max_replicas=8, down_cooldown_s=0.0),
                              min_interval_s=0.0)
    decision = scaler.step(["worker-a", "worker-b"], 0.0, ["worker-c", "worker-d", "worker-e"])
    assert decision.replicas == 3 and FakeApiServer.replicas == 3
    patches = [(path, ctype, body) for verb, path, ctype, body in FakeApiServer.requests if verb == "PATCH"]
    # the pods first (parked ones cost 0, those in use 1000), then the scale
    assert patches[-1] == (SCALE_PATH, "application/strategic-merge-patch+json", {"spec": {"replicas": 3}})
    costs = {path[len(POD_PATH):]: body["metadata"]["annotations"][DELETION_COST] for path, _, body in patches[:-1]}
    assert costs == {"worker-a": "1000", "worker-b": "1000", "worker-c": "0", "worker-d": "0", "worker-e": "0"}
    assert {ctype for _, ctype, _ in patches} == {"application/strategic-merge-patch+json"}
    api_client.close()
