"""Container / pod health probe of `cryoptycho serve`: exit 0 when healthy, 1 (with the reason) if not.

Healthy means both:

* the control socket answers ``ping`` — the manager loop that owns every socket is turning (a
  process that still listens but whose loop is wedged fails here);
* the Prometheus endpoint answers and reports ``cryoptycho_up`` = 1 (the service started and has
  not shut down).

Endpoints come from the daemon's own settings (``CRYOPTYCHO_CONTROL``, ``CRYOPTYCHO_METRICS_HOST``,
``CRYOPTYCHO_METRICS_PORT``, defaults as the daemon's) or the command line. With CURVE on
(``CRYOPTYCHO_CURVE_KEYS_DIR``), the ping uses the client key pair ``private/health.key_secret``
of that directory (``cryoptycho keys DIR --client health``; another name with ``--client``).
``--no-control`` skips the ping.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import urllib.request

from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError, ControlTimeout, ProtocolError
from cryoptycho.protocols.security import ClientCurve
from prometheus_client.parser import text_string_to_metric_families

UP_METRIC = "cryoptycho_up"
#: addresses a daemon binds to mean "every interface"; the probe reaches them on loopback
_ANY = {"0.0.0.0", "*", "::", "[::]", ""}


def probe_metrics(url: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, reason) for the metrics endpoint at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        return False, f"metrics endpoint {url} unreachable: {exc}"
    for family in text_string_to_metric_families(text):
        if family.name == UP_METRIC:
            values = [s.value for s in family.samples if s.name == UP_METRIC]
            if values and all(v == 1.0 for v in values):
                return True, "up"
            return False, f"{UP_METRIC} = {values} (the service is not running)"
    return False, f"{UP_METRIC} missing from {url}"


def probe_control(endpoint: str, timeout_s: float, curve: ClientCurve | None = None) -> tuple[bool, str]:
    """(healthy, reason) for a ``ping`` on the control socket at ``endpoint``."""
    try:
        with ControlClient(endpoint, timeout_s=timeout_s, retries=1, curve=curve) as client:
            client.ping()
    except (ControlTimeout, ControlError, ProtocolError) as exc:
        return False, f"control {endpoint} did not answer ping: {exc}"
    return True, "pong"


def loopback(endpoint: str) -> str:
    """``tcp://0.0.0.0:5602`` → ``tcp://127.0.0.1:5602`` (a bind address is not a peer address)."""
    match = re.fullmatch(r"(tcp://)(.*):(\d+)", endpoint)
    if match and match.group(2) in _ANY:
        return f"{match.group(1)}127.0.0.1:{match.group(3)}"
    return endpoint


def main(argv: list[str] | None = None) -> int:
    host = os.environ.get("CRYOPTYCHO_METRICS_HOST", "127.0.0.1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", default=os.environ.get("CRYOPTYCHO_CONTROL", "tcp://127.0.0.1:5602"))
    parser.add_argument("--no-control", action="store_true", help="skip the control ping")
    parser.add_argument("--host", default="127.0.0.1" if host in _ANY else host)
    parser.add_argument("--port", type=int, default=int(os.environ.get("CRYOPTYCHO_METRICS_PORT", "9640")))
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per check (two checks)")
    parser.add_argument("--curve-keys-dir", default=os.environ.get("CRYOPTYCHO_CURVE_KEYS_DIR"),
                        help="the daemon's CURVE key directory (server.key, private/<client>.key_secret)")
    parser.add_argument("--client", default="health", help="CURVE client name whose key pair the probe uses")
    args = parser.parse_args(argv)
    curve = ClientCurve.from_keys_dir(args.curve_keys_dir, args.client) if args.curve_keys_dir else None
    checks = [probe_metrics(f"http://{args.host}:{args.port}/metrics", args.timeout)]
    if not args.no_control:
        checks.append(probe_control(loopback(args.control), args.timeout, curve))
    failed = [reason for ok, reason in checks if not ok]
    print("; ".join(failed) or "healthy", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
