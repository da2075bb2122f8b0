"""Container / pod health probe: exit 0 when the daemon's service loop reports itself up.

Scrapes the Prometheus endpoint of `cryoptycho serve` and requires ``cryoptycho_up`` = 1 (the
service loop sets it while it turns), so a process that still listens but whose loop is stuck or
stopped is reported unhealthy. Host and port come from the daemon's own settings
(``CRYOPTYCHO_METRICS_HOST`` / ``CRYOPTYCHO_METRICS_PORT``) or the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

UP_METRIC = "cryoptycho_up"


def probe(url: str, timeout_s: float) -> tuple[bool, str]:
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
            return False, f"{UP_METRIC} = {values} (service loop not running)"
    return False, f"{UP_METRIC} missing from {url}"


def main(argv: list[str] | None = None) -> int:
    host = os.environ.get("CRYOPTYCHO_METRICS_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # bound on every interface: loopback reaches it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=host)
    parser.add_argument("--port", type=int, default=int(os.environ.get("CRYOPTYCHO_METRICS_PORT", "9640")))
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds")
    args = parser.parse_args(argv)
    healthy, reason = probe(f"http://{args.host}:{args.port}/metrics", args.timeout)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
