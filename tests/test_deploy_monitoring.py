"""Prometheus scrape/alert config and the Grafana dashboard against the daemon's real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryoptycho.daemon.metrics import ServiceMetrics
from deploy_support import DEPLOY, default_ports, yaml_docs
from prometheus_client.metrics import MetricWrapperBase

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cryoptycho.json"
METRIC = re.compile(r"\bcryoptycho_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(cryoptycho_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")
#: labels Prometheus attaches to every scraped series (not defined by the daemon)
TARGET_LABELS = {"instance", "job", "microscope"}


SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("_sum", "_count", "_created"),
            "stateset": ("",), "enum": ("",)}


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, set[str]]]:
    """Sample name → label → known values, for every metric the daemon defines.

    Names and label names come from the metric objects (a labelled metric has no samples until
    a label value is used); label values from the series the daemon pre-creates."""
    metrics = ServiceMetrics()
    out: dict[str, dict[str, set[str]]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labelnames = obj._labelnames  # no public accessor; stable across prometheus_client releases
        for family in obj.describe():
            for suffix in SUFFIXES[family.type]:
                labels = out.setdefault(family.name + suffix, {})
                for label in labelnames:
                    labels.setdefault(label, set())
                if family.type == "histogram" and suffix == "_bucket":
                    labels.setdefault("le", set())
    for family in metrics.registry.collect():
        for sample in family.samples:
            for key, value in sample.labels.items():
                out[sample.name].setdefault(key, set()).add(value)
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alert_exprs() -> Iterator[tuple[str, str]]:
    (rules,) = yaml_docs(DEPLOY / "prometheus" / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]


def all_exprs() -> list[tuple[str, str]]:
    return [*panel_exprs(dashboard()), *alert_exprs()]


def check_expr(where: str, expr: str, exported: dict[str, dict[str, set[str]]]) -> None:
    names = set(METRIC.findall(expr))
    assert names, f"{where}: queries no cryoptycho metric: {expr}"
    for name in names:
        assert name in exported, f"{where}: {name} is not exported by daemon/metrics.py"
    for name, body in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            assert label in exported[name], f"{where}: {name} has no label {label!r}"
            if op == "=" and exported[name][label]:  # closed label sets are pre-created
                assert value in exported[name][label], f"{where}: {name}{{{label}}} never takes {value!r}"
    defined = {label for n in names for label in exported[n]} | TARGET_LABELS | {"le"}
    for group in BY.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            assert label in defined, f"{where}: groups by {label!r}, which {sorted(names)} lack"


def test_every_dashboard_and_alert_query_uses_metrics_the_daemon_defines(exported: dict) -> None:
    exprs = all_exprs()
    assert len(exprs) > 20
    for where, expr in exprs:
        check_expr(where, expr, exported)


def test_the_metric_check_catches_a_wrong_name_label_or_value(exported: dict) -> None:
    for bad in ["rate(cryoptycho_frames_recieved_total[1m])",
                'cryoptycho_scans_total{result="failed"}',
                'cryoptycho_scans_in_state{state="sleeping"}',
                "sum by (reason) (cryoptycho_queue_depth_frames)"]:
        with pytest.raises(AssertionError):
            check_expr("probe", bad, exported)


def test_dashboard_covers_the_operators_questions(exported: dict) -> None:
    board = dashboard()
    assert board["uid"] == "cryoptycho-live"  # links and provisioning rely on it: never change it
    assert len(board["uid"]) <= 40
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        # every panel and query follows the variable, so the JSON imports into any Grafana
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert all('instance=~"$instance"' in t["expr"] for t in panel["targets"]), panel["title"]
    queried = " ".join(expr for _, expr in panel_exprs(board))
    wanted = {
        "frames in": "cryoptycho_frames_received_total", "folded in": "cryoptycho_frames_used_total",
        "drops by reason": "cryoptycho_frames_dropped_total", "queue depth": "cryoptycho_queue_depth_frames",
        "latency": "cryoptycho_frame_to_preview_latency_seconds_bucket", "loss": "cryoptycho_loss",
        "resolution": "cryoptycho_resolution_meters", "scans by outcome": "cryoptycho_scans_total",
        "gpu memory": "cryoptycho_gpu_memory_used_bytes", "state": "cryoptycho_scans_in_state",
    }
    for need, metric in wanted.items():
        assert metric in queried, f"the dashboard does not show {need} ({metric})"


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    (compose,) = yaml_docs(DEPLOY / "compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    (providers,) = yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "cryoptycho.yaml")
    path = providers["providers"][0]["options"]["path"]
    host_dir = next(src for src, dst in mounts.items() if dst == path)
    assert (DEPLOY / host_dir / DASHBOARD.name).samefile(DASHBOARD)
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (sources,) = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    prom_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{prom_port}"


def test_prometheus_scrapes_the_daemon_and_loads_the_alerts() -> None:
    (config,) = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cryoptycho"  # alerts select on it
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"cryoptycho:{default_ports()['metrics']}"]
    (compose,) = yaml_docs(DEPLOY / "compose.yaml")
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]
               if v.startswith(".")}
    for rule_file in config["rule_files"]:
        assert rule_file in mounted and (DEPLOY / mounted[rule_file]).is_file()
    assert 'job="cryoptycho"' in dict(alert_exprs())["CryoptychoDown"]


def test_alerts_have_severity_and_summary() -> None:
    (rules,) = yaml_docs(DEPLOY / "prometheus" / "alerts.yml")
    names = set()
    for rule in rules["groups"][0]["rules"]:
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        names.add(rule["alert"])
    assert {"CryoptychoDown", "CryoptychoFramesDropped", "CryoptychoPreviewLatencyHigh"} <= names


def test_dashboard_file_is_stable_json(tmp_path: Path) -> None:
    text = DASHBOARD.read_text()
    assert text.endswith("\n") and json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n" == text


# --- Kubernetes (Prometheus Operator) and promtool --------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def _k8s_doc(kind: str) -> dict[str, Any]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} in deploy/k8s")


def podmonitor_job() -> str:
    """The `job` label the Prometheus Operator gives the PodMonitor's targets: the value of the
    pod label named by spec.jobLabel, else "<namespace>/<PodMonitor name>"; a relabeling that
    targets `job` (applied after the operator's own) wins over both."""
    monitor = _k8s_doc("PodMonitor")
    pod_labels = _k8s_doc("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    (kustom,) = yaml_docs(DEPLOY / "k8s" / "kustomization.yaml")
    job = f"{kustom['namespace']}/{monitor['metadata']['name']}"
    if monitor["spec"].get("jobLabel"):
        job = pod_labels[monitor["spec"]["jobLabel"]]
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        for relabel in endpoint.get("relabelings", []):
            if relabel.get("targetLabel") == "job" and relabel.get("action", "replace") == "replace":
                job = relabel["replacement"]
    return job


def test_prometheus_rule_carries_the_alerts_file() -> None:
    (rules,) = yaml_docs(DEPLOY / "prometheus" / "alerts.yml")
    assert _k8s_doc("PrometheusRule")["spec"] == rules


def test_podmonitor_job_is_the_one_the_alerts_select() -> None:
    job = podmonitor_job()
    assert job == "cryoptycho"
    assert f'job="{job}"' in dict(alert_exprs())["CryoptychoDown"]


@needs_promtool
def test_promtool_accepts_the_rules_and_the_prometheus_config(tmp_path: Path) -> None:
    import yaml

    rule = tmp_path / "k8s-rules.yml"
    rule.write_text(yaml.safe_dump(_k8s_doc("PrometheusRule")["spec"]))
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    done = subprocess.run([PROMTOOL, "check", "rules", str(alerts), str(rule)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # the scrape config, with its rule file where the compose stack mounts it
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", str(alerts))
    (tmp_path / "prometheus.yml").write_text(config)
    done = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
@pytest.mark.parametrize("where", ["kubernetes", "compose"])
def test_daemon_down_alert_fires_for_the_job_each_deployment_gives(where: str, tmp_path: Path) -> None:
    """promtool's rule unit test: a target of the job the PodMonitor (or prometheus.yml) really
    produces goes down, and CryoptychoDown fires for it."""
    import yaml

    (config,) = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    job = podmonitor_job() if where == "kubernetes" else config["scrape_configs"][0]["job_name"]
    instance = "10.1.2.3:9640"
    (rules,) = yaml_docs(DEPLOY / "prometheus" / "alerts.yml")
    down = next(r for r in rules["groups"][0]["rules"] if r["alert"] == "CryoptychoDown")
    annotations = {k: v.replace("{{ $labels.instance }}", instance) for k, v in down["annotations"].items()}
    case = {
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": f'up{{job="{job}", instance="{instance}"}}', "values": "1 1 0x12"}],
            "alert_rule_test": [{
                "eval_time": "3m30s", "alertname": "CryoptychoDown",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "job": job, "instance": instance},
                                "exp_annotations": annotations}],
            }],
        }],
    }
    path = tmp_path / "down_test.yml"
    path.write_text(yaml.safe_dump(case))
    done = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
