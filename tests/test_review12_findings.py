"""review12's proof tests of defects found in the session's merged change (bd1685b..32b8bc2).

Each test asserts the behaviour the code should have and fails today because of the defect it
names: it is marked ``xfail(strict=True)``, so a fix turns it into an XPASS, which fails the run
until its mark is removed."""

from __future__ import annotations

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from daemon_support import loopback_config


@pytest.mark.xfail(strict=True, reason="review12: encode_reply bounds a reply's bytes (max_header_bytes) but not "
                   "its values (max_header_values): a reply our own client cannot read is sent as is")
def test_a_reply_over_the_clients_value_limit_is_answered_readably(tmp_path):
    """``set_options`` echoes the options it set. ``aberrations`` has no length bound, so a request
    within the daemon's max_header_values (65,536) sets a list that, with the ~100 other options
    echoed beside it, makes a reply of more values than the client reads: the change is applied,
    and the caller learns only a ProtocolError about the daemon's own reply — as does every later
    defaults set_options, whose reply echoes the same list."""
    from cryoptycho.daemon.service import BackgroundService

    n = Limits().max_header_values - 64  # the request (its list and ~10 envelope values) is within it
    bg = BackgroundService(loopback_config(tmp_path))
    try:
        with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
            try:
                reply = ctl.request("set_options", options={"aberrations": ["C10"] * n})
            except ProtocolError as exc:
                pytest.fail(f"the daemon's reply could not be read by its own client: {exc}")
            # either applied and echoed, or refused by name: a reply the client reads
            assert reply.success or reply.result.get("rule"), reply
            assert ctl.ping()["pong"] is True
    finally:
        bg.stop()
