"""The daemon's open-file limit (RLIMIT_NOFILE): raised to the hard limit at start, and a start
refused below what one daemon needs, naming the figures and how to raise them.

Running out of descriptors is not an error the daemon can answer: libzmq aborts the process
when a socket's or context's internal file cannot be made ("Too many open files
(src/epoll.cpp:38)", SIGABRT: it has no error path there), and a spool that cannot be opened
loses a detector series that is never sent again."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("cryoptycho.serve")

#: the descriptors of a daemon with no scan and no peer: measured 24 on Linux (3 standard
#: streams, the spool lock, 10 sockets — the 3 bound ZeroMQ endpoints, the Prometheus listener,
#: ZeroMQ's internal ones —, 8 eventfd/epoll files: each ZeroMQ context's I/O thread and reaper
#: hold an epoll file and a mailbox, each ZeroMQ socket a mailbox) and 32-34 with a DECTRIS
#: source reading one series; twice the idle figure leaves room for the source's context and
#: sockets and for library internals (HDF5, logging handlers)
BASE = 48
#: TCP connections in flight at once (one descriptor each: producers, subscribers, control
#: clients, Prometheus scrapes, the detector's DCU); a site with more peers needs more
PEERS = 64
#: per scan the daemon holds (running or queued): its spool file and journal for its whole
#: life, its result file and a temporary one while they are written
PER_SCAN = 4
#: per DECTRIS worker process (``[dectris] worker_processes``): its pipes and shared memory
PER_WORKER_PROCESS = 4
#: the figure the refusal suggests: what a systemd unit or container is commonly given
SUGGESTED = 65536
#: where the hard limit is "unlimited", the kernel still caps it (fs.nr_open, 1,048,576 by default)
UNLIMITED_CAP = 1 << 20


@dataclass(frozen=True)
class OpenFileLimit:
    soft: int  #: the soft limit after the raise (RLIM_INFINITY as UNLIMITED_CAP)
    hard: int
    before: int  #: the soft limit the process was started with


def floor(config: Any) -> int:
    """Descriptors one daemon with ``config`` needs at least (module constants, each explained):
    its own, its peers', every scan it may hold (``max_concurrent_scans`` +
    ``max_queued_scans``) and its DECTRIS worker processes. A DECTRIS series waiting beyond
    ``max_queued_scans`` holds two more (its spool and journal): the raise covers those."""
    return BASE + PEERS + PER_SCAN * _scans(config) + PER_WORKER_PROCESS * _worker_processes(config)


def _scans(config: Any) -> int:
    return config.max_concurrent_scans + config.max_queued_scans


def _worker_processes(config: Any) -> int:
    return config.source_workers if config.source is not None and config.dectris.worker_processes else 0


def raise_soft_limit() -> OpenFileLimit:
    """The soft limit up to the hard one, as servers holding a descriptor per queued job do:
    systemd's default is soft 1,024 under a hard 524,288, and about 500 queued DECTRIS series
    (two files each) ran out of the soft one. Logged with the figures; a refused raise is a
    warning (the limit is checked against :func:`floor` next)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, want = _finite(soft), _finite(hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit (RLIMIT_NOFILE) from %d to the hard limit %d (%s)",
                        soft, want, exc)
        else:
            log.info("open-file limit (RLIMIT_NOFILE) raised from %d to %d, the hard limit", soft, want)
            return OpenFileLimit(want, want, before)
    log.info("open-file limit (RLIMIT_NOFILE) is %d (hard limit %s)", before,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return OpenFileLimit(before, want, before)


def _finite(limit: int) -> int:
    return UNLIMITED_CAP if limit == resource.RLIM_INFINITY else limit


def refusal(limit: OpenFileLimit, config: Any) -> str | None:
    """Why the daemon must not start with ``limit`` (None: it may), naming the limit, the floor
    and how to raise it."""
    need = floor(config)
    if limit.soft >= need:
        return None
    return (f"the open-file limit (RLIMIT_NOFILE) is {limit.soft} (hard limit {limit.hard}), below the {need} "
            f"this daemon needs ({BASE} for itself, {PEERS} for its peers' connections, {PER_SCAN} per scan for "
            f"max_concurrent_scans {config.max_concurrent_scans} + max_queued_scans {config.max_queued_scans}"
            + (f", {PER_WORKER_PROCESS} per DECTRIS worker process" if _worker_processes(config) else "")
            + "): out of descriptors, ZeroMQ would abort the daemon and detector series would be lost. Raise the hard limit: "
            f"LimitNOFILE={SUGGESTED} in the systemd unit (deploy/systemd/cryoptycho@.service), "
            f"`ulimit -n {SUGGESTED}` in the shell that starts it (as root or within `ulimit -Hn`), "
            f"--ulimit nofile={SUGGESTED} for docker run (deploy/README.md, Open files)")
