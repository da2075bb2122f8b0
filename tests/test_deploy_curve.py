"""CURVE on the real daemon, as deploy/k8s switches it on: keys made by `cryoptycho keys`, the
daemon given the directory (CRYOPTYCHO_CURVE_KEYS_DIR, from a Secret in Kubernetes); admitted
clients get through, others get no answer; the container health probe uses its own key."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from cryoptycho.daemon.broker import Broker, BrokerOptions, parse_backend
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlTimeout
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.security import ClientCurve
from daemon_support import metrics_of, start_daemon, synthetic_scan, wait_for
from deploy_support import DEPLOY, yaml_docs


def _healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _secrets(keys: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets as deploy/README.md creates them (`kubectl create secret generic
    --from-file`: each file's name is its key)."""
    def files(*paths: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in paths}

    return {
        "cryoptycho-curve-server": files(keys / "server.key", keys / "server.key_secret",
                                         keys / "private" / "health.key_secret"),
        "cryoptycho-curve-clients": files(*sorted((keys / "clients").iterdir())),
        "cryoptycho-curve-broker": files(keys / "server.key", keys / "private" / "broker.key_secret"),
    }


def _mounted(workload: dict, env_name: str, secrets: dict[str, dict[str, bytes]], dest: Path) -> Path:
    """What the pod sees at the key directory its environment names: the projected volume
    mounted there, built from ``secrets`` item by item as the kubelet would."""
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    keys_dir = next(e["value"] for e in container["env"] if e["name"] == env_name)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == keys_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    for source in volume["projected"]["sources"]:
        data = secrets[source["secret"]["name"]]
        for item in source["secret"]["items"]:
            path = dest / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
    return dest


def test_daemon_with_curve_admits_only_its_clients(tmp_path: Path) -> None:
    """Keys as deploy/README.md makes them, laid out as the manifests mount them."""
    keys = tmp_path / "keys"
    made = subprocess.run(["cryoptycho", "keys", str(keys), "--client", "health", "--client", "producer",
                           "--client", "broker"],
                          capture_output=True, text=True, check=False, env=os.environ.copy())
    assert made.returncode == 0, made.stderr
    docs = {d["kind"]: d for name in ("statefulset.yaml", "broker.yaml") for d in yaml_docs(DEPLOY / "k8s" / name)}
    secrets = _secrets(keys)
    pod_keys = _mounted(docs["StatefulSet"], "CRYOPTYCHO_CURVE_KEYS_DIR", secrets, tmp_path / "daemon-pod")
    broker_keys = _mounted(docs["Deployment"], "CRYOPTYCHO_BROKER_CURVE_KEYS_DIR", secrets, tmp_path / "broker-pod")
    daemon = start_daemon(tmp_path, "--set", f"curve_keys_dir={pod_keys}")
    try:
        with ControlClient(daemon.control, timeout_s=30, retries=1,
                           curve=ClientCurve.from_keys_dir(keys, "health")) as ctl:
            assert ctl.ping()["pong"] is True
        with ControlClient(daemon.control, timeout_s=1, retries=1) as plain, pytest.raises(ControlTimeout):
            plain.ping()  # no keys: the handshake fails, nothing is answered
        stranger = tmp_path / "stranger"
        subprocess.run(["cryoptycho", "keys", str(stranger), "--client", "x"], check=True, capture_output=True)
        with ControlClient(daemon.control, timeout_s=1, retries=1, curve=ClientCurve(
                stranger / "private" / "x.key_secret", keys / "server.key")) as unknown, \
                pytest.raises(ControlTimeout):
            unknown.ping()  # a valid key pair the daemon never admitted

        scan = synthetic_scan(n_side=6)
        with Producer(daemon.ingest, control=daemon.control,
                      curve=ClientCurve.from_keys_dir(keys, "producer")) as producer:
            producer.start_scan(**scan.start_fields("curve"))
            producer.send_frames(scan.frames)
            producer.end_scan()
        wait_for(lambda: metrics_of(daemon).get("cryoptycho_frames_received_total") == len(scan.frames),
                 60, "the frames sent over CURVE", daemon)

        # the broker forwards to a CURVE daemon with its own client key (plain producers → broker)
        broker = Broker(BrokerOptions(ingest="tcp://127.0.0.1:*", control=None,
                                      curve=ClientCurve.from_keys_dir(broker_keys, "broker")),
                        [parse_backend(f"{daemon.ingest},control={daemon.control}")]).start()
        try:
            wait_for(lambda: broker.status()["backends"][0]["last_status_age_s"] is not None, 120,
                     "the daemon's status over CURVE", daemon)
            again = synthetic_scan(n_side=6, seed=1)
            # the broker's own ingest is plain (a relay: no delivery receipt); the frames count below
            with Producer(broker.ingest_endpoint, confirm=False) as producer:
                producer.start_scan(**again.start_fields("via-broker"))
                producer.send_frames(again.frames)
                producer.end_scan()
            total = len(scan.frames) + len(again.frames)
            wait_for(lambda: metrics_of(daemon).get("cryoptycho_frames_received_total") == total,
                     60, "the frames the broker forwarded over CURVE", daemon)
        finally:
            broker.stop()

        health = _healthcheck()
        port = daemon.ready["metrics_port"]
        args = ["--port", str(port), "--control", daemon.control, "--timeout", "2"]
        assert health.main([*args, "--curve-keys-dir", str(pod_keys)]) == 0
        assert health.main(args) == 1  # the probe without the key cannot ping
    finally:
        daemon.stop()
