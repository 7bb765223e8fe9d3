"""deploy/grafana and deploy/prometheus.yml agree with the metrics the services export
(services/common/metrics.py) and with the compose file; docs/metrics.md lists them all.

Grafana cannot run here: the dashboard is checked against the essentials of Grafana's
dashboard JSON model (what a provisioned dashboard needs to load and draw), and every
query is parsed by the PromQL subset of services/tools/promql.py, which the figure script
evaluates too."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from services.common.metrics import metric_names
from services.tools import dashboard_figure
from services.tools.promql import metric_names_in, parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pipeserve.json"
# what prometheus_client exports beside ours (its process collector), and the dashboard uses
CLIENT_DEFAULTS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_the_dashboard_has_the_json_model_grafana_needs():
    d = dashboard()
    assert d["uid"] == "pipeserve" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["time"]["from"].startswith("now-") and d["time"]["to"] == "now"
    assert isinstance(d["templating"]["list"], list) and isinstance(d["annotations"]["list"], list)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        assert p["type"] in ("timeseries", "stat") and p["title"], p
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):          # panels do not overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]


@pytest.mark.parametrize("title,expr", queries())
def test_every_query_parses_and_uses_exported_metrics(title, expr):
    node = parse(dashboard_figure.resolve(expr, rate_interval="20s"))
    names = metric_names_in(node)
    assert names, f"{title}: {expr} selects no metric"
    unknown = names - metric_names() - CLIENT_DEFAULTS
    assert not unknown, f"{title}: {expr} uses metrics no service exports: {unknown}"


def test_the_dashboard_covers_what_the_issue_asks_for():
    used = set().union(*(metric_names_in(parse(dashboard_figure.resolve(e, "20s"))) for _, e in queries()))
    wanted = {
        "pipeserve_frontdoor_requests_total",            # requests by outcome
        "pipeserve_frontdoor_latency_seconds_bucket",    # latency: end to end
        "pipeserve_router_stage_seconds_bucket",         # latency: per stage
        "pipeserve_worker_queue_length",                 # queue length
        "pipeserve_worker_batch_size_sum",               # batch sizes
        "pipeserve_router_queries_total", "pipeserve_router_reroutes_total",   # drops, reroutes
        "pipeserve_worker_queries_total",                # drops and sheds at the workers
        "pipeserve_controller_plan_version",             # plan version
        "pipeserve_controller_workers",                  # active / parked workers
        "pipeserve_controller_demand_qps",               # demand estimate
        "pipeserve_controller_solve_seconds_sum",        # solve time
        "pipeserve_worker_model_load_seconds_sum",       # model load time
    }
    assert wanted <= used, wanted - used


def test_the_figure_draws_panels_of_the_dashboard():
    titles = {p["title"] for p in dashboard()["panels"]}
    assert set(dashboard_figure.MAIN_PANELS) <= titles, set(dashboard_figure.MAIN_PANELS) - titles


def test_grafana_provisioning_points_at_the_dashboard_and_the_prometheus_service():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = ds["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pipeserve.yml").read_text())
    [prov] = provider["providers"]
    mounts = dict(v.rsplit(":", 2)[:2] if v.endswith(":ro") else v.split(":", 1)
                  for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == prov["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    for host_path in mounts:
        assert (DEPLOY / host_path).exists(), host_path


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    services = compose()["services"]
    expected = set()
    for name, svc in services.items():
        cmd = svc.get("command") or []
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        if not argv or not argv[0].startswith("pipeserve-") or argv[0] == "pipeserve-loadgen":
            continue
        assert "--metrics-port" in argv, f"{name} serves no metrics"
        port = argv[argv.index("--metrics-port") + 1]
        assert port in [str(p) for p in svc["expose"]], f"{name}: metrics port {port} not exposed"
        expected.add(f"{name}:{port}")
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == expected
    assert str(services["prometheus"]["volumes"][0]).startswith("./prometheus.yml:")


def test_docs_list_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    listed = set(re.findall(r"`(pipeserve_[a-z_]+)", doc))
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in metric_names()}
    missing = {b for b in bases if b not in listed and f"{b}_total" not in listed}
    assert not missing, f"docs/metrics.md does not list {sorted(missing)}"
