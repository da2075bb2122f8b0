"""Control replies stay readable on a daemon that runs for years: the lists of `status` and
`list_scans` are bounded (newest or next N, with their totals), so that no reply outgrows a
client's ``max_header_bytes`` (1 MiB), which made it unreadable."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import synthetic_scan, wait_for

WAITING = 3000  # ≈ 0.5 kB of summary each: 1.5 MB listed whole
UNCLOSED = 5000  # ≈ 0.3 kB of note each (what _kept_note writes): 1.5 MB listed whole


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=4, m=32)


def test_status_and_list_scans_replies_stay_under_the_clients_header_limit(tmp_path, scan, caplog):
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.session import Session
    from daemon_support import loopback_config

    cfg = loopback_config(tmp_path, max_concurrent_scans=1)
    bg = BackgroundService(cfg)
    svc = bg.service
    scans = svc.scans
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("running"))  # holds the only slot: the others wait
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the scan to run")
            injected = threading.Event()

            def inject(_r, _e) -> None:  # on the manager thread, as the daemon's own state changes
                spec = scans.sessions["running"].spec
                for i in range(WAITING):
                    waiting = Session(replace(spec, scan_id=f"series-{i:05d}"), {"host": 0, "device": 0})
                    scans.sessions[waiting.scan_id] = waiting
                    scans.waiting.append(waiting.scan_id)
                for i in range(UNCLOSED):
                    scans.unclosed[f"failed-{i:05d}"] = (
                        f"its 65536 frames are kept in its journal /var/spool/cryoptycho/failed-{i:05d}.spool.h5"
                        ".journal: control `finish_scan` or the next start rebuilds /var/spool/cryoptycho/"
                        f"failed-{i:05d}.spool.h5 from it and reconstructs the scan")
                injected.set()

            scans.after_disk(lambda: None, inject)
            assert injected.wait(60)
            status = ctl.status()  # before: the reply's header exceeded 1 MiB, and the client refused it
            assert status["running"] == ["running"]
            assert status["waiting_total"] == WAITING and status["unclosed_spools_total"] == UNCLOSED
            # the next to run, in queue order, and the newest failed closes
            assert status["waiting"][0] == "series-00000" and 0 < len(status["waiting"]) < WAITING
            assert status["waiting"] == [f"series-{i:05d}" for i in range(len(status["waiting"]))]
            assert "running" in status["scans"] and status["scans_total"] == WAITING + 1
            assert len(status["scans"]) <= len(status["waiting"]) + 1
            newest = list(status["unclosed_spools"])
            assert newest[-1] == f"failed-{UNCLOSED - 1:05d}" and 0 < len(newest) < UNCLOSED
            assert newest == [f"failed-{i:05d}" for i in range(UNCLOSED - len(newest), UNCLOSED)]

            listed = ctl.call("list_scans")
            assert listed["total"] == WAITING + 1 and 0 < len(listed["scans"]) < WAITING
            assert listed["scans"][-1]["scan_id"] == f"series-{WAITING - 1:05d}"  # the newest kept
            # and the running scan, listed before them all (watch and the viewer seed from this)
            ids = [s["scan_id"] for s in listed["scans"]]
            assert ids[0] == "running" and ids[1:] == [f"series-{i:05d}" for i in range(WAITING - len(ids) + 1, WAITING)]
            assert ctl.list_scans(listed["scans"][0]["state"])[0]["scan_id"] == "running"
            with caplog.at_level("WARNING", logger="cryoptycho.protocols.control"):
                cut = ctl.list_scans()  # the SDK's list: the daemon's count is not lost silently
            assert len(cut) == len(listed["scans"]) and f"holds {WAITING + 1} scans" in caplog.text
            finished = ctl.call("list_scans", state="finished")
            assert finished == {"scans": [], "total": 0}

            def drop(_r, _e) -> None:  # let the test's scans go before the service stops
                for i in range(WAITING):
                    scans.sessions.pop(f"series-{i:05d}")
                    scans.waiting.remove(f"series-{i:05d}")
                scans.unclosed.clear()
                injected.clear()

            scans.after_disk(lambda: None, drop)
            wait_for(lambda: not injected.is_set(), 60, "the test's scans to be dropped")
            one.abort("test ends")
    finally:
        bg.stop()


def test_status_stays_readable_with_the_longest_scan_ids_and_reasons(tmp_path, scan):
    """Bounded by count alone, `status` outgrew the client's 1 MiB with long strings: 200 live
    scans with 1024-character ids (the largest ``max_scan_id_length``) and a 4096-character
    cancel reason (``end_reason`` while its worker stops) and error in each summary, 200
    waiting ids, 200 failed closes whose notes name long paths: a 3.2 MB reply the client refused.
    Each list is bounded in bytes too, its total beside it."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.session import Session
    from daemon_support import loopback_config

    n = 300
    cfg = loopback_config(tmp_path, max_concurrent_scans=1)
    bg = BackgroundService(cfg)
    svc = bg.service
    scans = svc.scans
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("running"))
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the scan to run")
            injected = threading.Event()
            long_ids = [f"{i:05d}-" + "x" * 1018 for i in range(n)]

            def inject(_r, _e) -> None:  # on the manager thread, as the daemon's own state changes
                spec = scans.sessions["running"].spec
                for i, sid in enumerate(long_ids):
                    waiting = Session(replace(spec, scan_id=sid), {"host": 0, "device": 0})
                    waiting.end_reason = f"cancel {i}: " + "r" * 4080
                    waiting.error = f"spool {i}: " + "e" * 4080
                    scans.sessions[sid] = waiting
                    scans.waiting.append(sid)
                    where = f"/data/facility/{'deep/' * 150}{sid}.spool.h5"
                    scans.unclosed[sid] = (f"its 65536 frames are kept in its journal {where}.journal: control "
                                           f"`finish_scan` or the next start rebuilds {where} from it")
                injected.set()

            scans.after_disk(lambda: None, inject)
            assert injected.wait(60)
            status = ctl.status()  # before: the client refused the reply (max_header_bytes)
            assert status["running"] == ["running"] and "running" in status["scans"]
            assert status["waiting_total"] == n and status["unclosed_spools_total"] == n
            assert status["scans_total"] == n + 1
            # the next to run, in queue order; the newest failed closes; none skipped
            assert status["waiting"] == long_ids[:len(status["waiting"])] and status["waiting"]
            assert list(status["scans"]) == ["running", *long_ids[:len(status["scans"]) - 1]]
            assert len(status["scans"]) > 1
            assert list(status["unclosed_spools"]) == long_ids[n - len(status["unclosed_spools"]):]
            assert status["unclosed_spools"]

            def drop(_r, _e) -> None:
                for sid in long_ids:
                    scans.sessions.pop(sid)
                    scans.waiting.remove(sid)
                scans.unclosed.clear()
                injected.clear()

            scans.after_disk(lambda: None, drop)
            wait_for(lambda: not injected.is_set(), 60, "the test's scans to be dropped")
            one.abort("test ends")
    finally:
        bg.stop()


def test_a_reply_larger_than_a_client_reads_is_answered_as_a_named_failure():
    """The last line of defence for any control reply (status, list_scans, receipt, a late
    reply): one whose header exceeds ``max_header_bytes`` was sent whole, and the client could
    only refuse it ("header: … bytes exceed the limit") — the caller never learned what it
    asked. It is now a failed reply (rule ``max_header_bytes``) that names the method."""
    from cryoptycho.protocols.control import handle
    from cryoptycho.protocols.limits import Limits
    from cryoptycho.protocols.messages import Reply, Request, decode, encode

    limits = Limits()
    table = {"huge": lambda: {"text": "x" * (limits.max_header_bytes + 1)}, "small": lambda: {"n": 1}}
    for method, ok in (("huge", False), ("small", True)):
        parts = handle([b"client", *encode(Request(method, {}))], table, limits)
        reply = decode(parts[1:], limits)  # what the client reads, with its default limits
        assert isinstance(reply, Reply) and reply.success is ok
        if not ok:
            assert reply.result["rule"] == "max_header_bytes" and "'huge'" in reply.msg, reply


def test_a_reply_of_more_values_than_a_client_reads_is_answered_as_a_named_failure():
    """As for bytes, for values (review12): a reply within ``max_header_bytes`` whose header
    holds more than ``max_header_values`` values (a one-byte value each: 65,537 zeros are 64 kB)
    was sent as it was, and the client refused it, the caller learning only a ProtocolError. It
    is now a failed reply (rule ``max_header_values``) that names the method; a reply at the
    limit is sent as it is."""
    from cryoptycho.protocols.control import handle
    from cryoptycho.protocols.limits import Limits
    from cryoptycho.protocols.messages import Reply, Request, decode, encode

    limits = Limits()
    # the reply's envelope (the reply map, its keys' values, the result map) holds a few values
    # besides the list: "many" is over by far, "most" under by far, both of one list
    table = {"many": lambda: {"list": [0] * limits.max_header_values},
             "most": lambda: {"list": [0] * (limits.max_header_values - 100)}}
    for method, ok in (("many", False), ("most", True)):
        parts = handle([b"client", *encode(Request(method, {}))], table, limits)
        reply = decode(parts[1:], limits)  # what the client reads, with its default limits
        assert isinstance(reply, Reply) and reply.success is ok
        if not ok:
            assert reply.result["rule"] == "max_header_values" and "'many'" in reply.msg, reply
        else:
            assert len(reply.result["list"]) == limits.max_header_values - 100


def test_aberration_lists_are_bounded_to_the_known_names_each_once(tmp_path):
    """``aberrations`` and ``parallax_aberrations`` name coefficients of gpu/probes.py's
    ABERRATIONS, each at most once: a list of 65,472 names was applied and then echoed in every
    later defaults reply, each over the client's max_header_values (review12)."""
    from cryoptycho.gpu.options import AberrationName, ReconOptions
    from cryoptycho.gpu.probes import ABERRATIONS
    from pydantic import ValidationError

    assert AberrationName.__args__ == ABERRATIONS  # the options' names are the engine's
    assert ReconOptions(aberrations=list(ABERRATIONS)).aberrations == list(ABERRATIONS)
    for field in ("aberrations", "parallax_aberrations"):
        for names, says in ((["C10"] * (len(ABERRATIONS) + 1), "at most"), (["C10", "C12a", "C10"], "C10 named more")):
            with pytest.raises(ValidationError, match=says) as err:
                ReconOptions(**{field: names})
            assert err.value.errors()[0]["loc"] == (field,)
