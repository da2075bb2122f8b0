"""systemd template unit, per-instance environment, Kubernetes manifests, site configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from cryoptycho.daemon.broker import parse_backend
from cryoptycho.daemon.config import load_config
from deploy_support import (
    DEPLOY,
    SITE_TOML,
    config_with_env,
    default_ports,
    env_text,
    port,
    seconds,
    unit_file,
    yaml_docs,
)

UNIT = DEPLOY / "systemd" / "cryoptycho@.service"
INSTANCE_ENV = DEPLOY / "systemd" / "instance-env.sh"
K8S = DEPLOY / "k8s"


def instance_env(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTANCE_ENV), *args], capture_output=True, text=True, check=False)


def test_site_config_is_valid_and_leaves_per_instance_keys_to_the_environment() -> None:
    config = load_config(SITE_TOML)
    assert config.max_concurrent_scans >= 1
    keys = set(tomllib.loads(SITE_TOML.read_text()))
    per_instance = {"ingest", "publish", "control", "metrics_host", "metrics_port", "spool_dir", "results_dir"}
    assert not keys & per_instance, "the TOML would override every instance's own endpoints"


def test_template_unit_is_a_notify_service_with_watchdog_restart_and_user() -> None:
    unit = unit_file(UNIT)
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert seconds(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"]
    assert service["User"][0] not in ("root", "0") and service["Group"]
    assert "CUDA_VISIBLE_DEVICES=%i" in service["Environment"]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in service["Environment"]  # %i = nvidia-smi index
    assert service["EnvironmentFile"] == ["/etc/cryoptycho/gpu%i.env"]
    exec_start = service["ExecStart"][0].split()
    assert exec_start[0].startswith("/") and exec_start[1] == "serve"
    assert exec_start[exec_start.index("--config") + 1] == "/etc/cryoptycho/cryoptycho.toml"
    # SIGTERM drains: the stop timeout must outlast the refinement that drain runs
    config = load_config(SITE_TOML)
    assert seconds(service["TimeoutStopSec"][0]) >= 2 * config.refine_time_budget_s
    assert service["KillSignal"] == ["SIGTERM"]
    assert "%i" in service["StateDirectory"][0]
    # with ProtectSystem=strict only the state directory is writable: caches under $HOME go there
    assert service["ProtectSystem"] == ["strict"]
    assert f"HOME=/var/lib/{service['StateDirectory'][0]}" in service["Environment"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("gpu", [0, 3])
def test_instance_env_gives_each_gpu_its_own_ports_and_directories(gpu: int, monkeypatch: pytest.MonkeyPatch) -> None:
    done = instance_env(str(gpu))
    assert done.returncode == 0, done.stderr
    env = env_text(done.stdout)
    config = config_with_env(monkeypatch, env)  # valid settings, and not overridden by the TOML
    base = default_ports()
    offset = 10 * gpu
    assert port(config.ingest) == base["ingest"] + offset
    assert port(config.publish) == base["publish"] + offset
    assert port(config.control) == base["control"] + offset
    assert config.metrics_port == base["metrics"] + offset
    state_dir = unit_file(UNIT)["Service"]["StateDirectory"][0].replace("%i", str(gpu))
    assert str(config.spool_dir).startswith(f"/var/lib/{state_dir}/")
    assert config.options.backend == "cupy"


def test_instance_env_rejects_bad_arguments() -> None:
    for args in [(), ("x",), ("1", "0"), ("1", "10", "h", "extra")]:
        done = instance_env(*args)
        assert done.returncode == 2 and done.stderr


def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    (kustom,) = yaml_docs(K8S / "kustomization.yaml")
    listed = set(kustom["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_one_daemon_per_gpu_with_its_own_volume_and_a_drain_window(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _k8s()
    sts = docs["StatefulSet/cryoptycho"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {}) or \
        container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container["volumeMounts"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    config = load_config(SITE_TOML)
    assert pod["terminationGracePeriodSeconds"] >= 2 * config.refine_time_budget_s
    env = {e["name"]: e["value"] for e in container["env"]}
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    config = config_with_env(monkeypatch, env)
    assert any(str(config.spool_dir).startswith(p) for p in mounted), "spool must be on the volume"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == dict(default_ports())
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    cm_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_path.parent == Path(cm_mount["mountPath"])
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_and_pod_monitor_match_the_pods() -> None:
    docs = _k8s()
    sts = docs["StatefulSet/cryoptycho"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    pod_ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = docs["Service/cryoptycho"]
    assert service["spec"]["clusterIP"] == "None"  # a scan must reach one named pod
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= pod_ports
    monitor = docs["PodMonitor/cryoptycho"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}


def test_config_map_carries_the_site_config() -> None:
    docs = _k8s()
    assert docs["ConfigMap/cryoptycho-config"]["data"]["cryoptycho.toml"].strip() == SITE_TOML.read_text().strip()


def test_broker_knows_every_daemon_of_the_stateful_set() -> None:
    docs = _k8s()
    sts = docs["StatefulSet/cryoptycho"]
    broker = docs["Deployment/cryoptycho-broker"]
    assert broker["spec"]["replicas"] == 1  # the routing table lives in one process
    args = broker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "broker"
    backends = [parse_backend(a.split("=", 1)[1]) for a in args if a.startswith("--backend=")]
    name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
    ports = default_ports()
    expected = [f"tcp://{name}-{i}.{svc}:{ports['ingest']}" for i in range(sts["spec"]["replicas"])]
    assert [b.ingest for b in backends] == expected
    assert [b.control for b in backends] == [e.replace(str(ports["ingest"]), str(ports["control"])) for e in expected]
    service = docs["Service/cryoptycho-broker"]
    container_ports = {p["name"] for p in broker["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_broker_unit_and_env_route_to_the_instances_of_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryoptycho.daemon.commands.broker import command as broker_command

    unit = unit_file(DEPLOY / "systemd" / "cryoptycho-broker.service")["Service"]
    assert unit["Type"] == ["notify"] and seconds(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"] and unit["User"][0] not in ("root", "0")
    assert unit["ExecStart"][0].split()[1] == "broker"
    done = subprocess.run(["sh", str(DEPLOY / "systemd" / "broker-env.sh"), "0", "2"],
                          capture_output=True, text=True, check=True)
    env = {k: v.strip('"') for k, v in env_text(done.stdout).items()}  # systemd strips the quotes
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = broker_command.make_context("broker", [])
    backends = ctx.params["backends"]
    for gpu, backend in zip((0, 2), backends, strict=True):
        daemon = env_text(instance_env(str(gpu)).stdout)
        assert backend.ingest == daemon["CRYOPTYCHO_INGEST"]
        assert backend.control == daemon["CRYOPTYCHO_CONTROL"]
    assert ctx.params["ingest"] == env["CRYOPTYCHO_BROKER_INGEST"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["cryoptycho@.service", "cryoptycho-broker.service"])
def test_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    # verify needs an existing ExecStart binary and, for a template, an instance name
    text = (DEPLOY / "systemd" / name).read_text().replace("/opt/cryoptycho/bin/cryoptycho", "/bin/true")
    path = tmp_path / name.replace("@.", "@0.")
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def _offline_security_supported() -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    done = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True, check=False)
    return "--offline" in done.stdout  # systemd >= 250


@pytest.mark.skipif(not _offline_security_supported(), reason="no systemd-analyze security --offline (systemd >= 250)")
@pytest.mark.parametrize(("name", "limit"), [("cryoptycho@.service", 2.0), ("cryoptycho-broker.service", 1.5)])
def test_units_are_hardened_per_systemd_analyze_security(name: str, limit: float, tmp_path: Path) -> None:
    """The exposure score systemd computes for the unit file (both units scored 6.0–6.5 MEDIUM
    before the hardening options were added); the GPU daemon keeps its device nodes, W+X pages
    for CUDA's JIT and the network (deploy/README.md)."""
    text = (DEPLOY / "systemd" / name).read_text().replace("/opt/cryoptycho/bin/cryoptycho", "/bin/true")
    path = tmp_path / name.replace("@.", "@0.")
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                          capture_output=True, text=True, check=False)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= limit, done.stdout
    # what the daemon cannot live with stays off, so a later "fix" does not break CUDA
    service = unit_file(DEPLOY / "systemd" / name)["Service"]
    assert "MemoryDenyWriteExecute" not in service
    if name.startswith("cryoptycho@"):
        assert "PrivateDevices" not in service and "DevicePolicy" not in service


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomization_renders() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["Namespace", "ConfigMap", "StatefulSet", "Service", "Service", "Deployment",
                            "PodMonitor", "PrometheusRule", "NetworkPolicy", "NetworkPolicy"])
    assert all(d["metadata"].get("namespace") == "cryoptycho" for d in rendered if d["kind"] != "Namespace")
    images = {c["image"] for d in rendered if d["kind"] in ("StatefulSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1 and "/" in images.pop()  # the kustomization's image replaced "cryoptycho"


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    """Every built-in kind against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
    unknown fields fail). The Prometheus Operator kinds have no schema there; their structure is
    checked by tests/test_deploy_monitoring.py."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = set()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.config.k8s.io/")):
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.add(doc["kind"])
    assert {"StatefulSet", "Service", "Deployment", "NetworkPolicy", "ConfigMap"} <= checked


def _port_names(pod_spec: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec["containers"] for p in c["ports"]}


def test_network_policies_open_ingest_and_control_only_to_the_broker_and_labelled_clients() -> None:
    docs = _k8s()
    pods = {"daemon": docs["StatefulSet/cryoptycho"], "broker": docs["Deployment/cryoptycho-broker"]}
    broker_labels = pods["broker"]["spec"]["template"]["metadata"]["labels"]
    client = {"cryoptycho.io/client": "true"}
    for component, workload in pods.items():
        template = workload["spec"]["template"]
        policy = docs[f"NetworkPolicy/cryoptycho-{component}"]["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert policy["policyTypes"] == ["Ingress"]
        names = _port_names(template["spec"])
        opened: dict[str, list[dict]] = {}
        for rule in policy["ingress"]:
            assert rule.get("from"), "a rule without `from` would admit every pod"
            for p in rule["ports"]:
                assert p["port"] in names, f"{component}: no container port named {p['port']}"
                opened.setdefault(p["port"], []).extend(rule["from"])
        assert set(opened) == set(names), f"{component}: every port is covered, none by accident"
        for name in ("ingest", "control"):
            peers = opened[name]
            for peer in peers:
                labels = peer["podSelector"]["matchLabels"]
                assert labels == client or (component == "daemon" and labels.items() <= broker_labels.items()), peer
            assert any(p["podSelector"]["matchLabels"] == client for p in peers)
    metrics_peers = [p["podSelector"]["matchLabels"] for p in
                     next(r for r in docs["NetworkPolicy/cryoptycho-daemon"]["spec"]["ingress"]
                          if any(p["port"] == "metrics" for p in r["ports"]))["from"]]
    assert metrics_peers == [{"app.kubernetes.io/name": "prometheus"}]
