"""The header's msgpack rules (PROTOCOL.md §2.1, the validation table's "path of the value" row)
held to a reference built from the documented rules alone: every refusal names a rule the header
breaks and the path of a value that breaks it; a header that breaks none is read."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.wire import read_header
from hypothesis import event, given, settings
from hypothesis import strategies as st

#: PROTOCOL.md §2.1: "maps and lists nest at most 32 levels"
DOCUMENTED_DEPTH = 32


class BadKey:
    """A map key msgpack can carry but the protocol refuses (not a string)."""

    def __init__(self, key: Any) -> None:
        self.key = key


def _keys() -> st.SearchStrategy[str]:
    # plain names: the documented path syntax (``a.b[3].c``) has no escaping
    return st.text("abcxyz_09", min_size=1, max_size=4)


def _leaves() -> st.SearchStrategy[Any]:
    good = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    )
    bad = st.one_of(
        st.binary(max_size=4),                                        # no_binary
        st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)),      # no_ext_types (-1)
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=3)),  # no_ext_types
    )
    return st.one_of(good, good, good, bad)


def _map_key() -> st.SearchStrategy[Any]:
    return st.one_of(_keys(), _keys(), _keys(), _keys(), _keys(),
                     st.binary(min_size=1, max_size=3),            # string_key
                     st.integers(0, 9).map(BadKey),                 # not a str at all
                     st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2)).map(BadKey))


def _build(draw: Any, budget: int) -> Any:
    kind = draw(st.integers(0, 3)) if budget > 0 else 0
    if kind <= 1:
        return draw(_leaves())
    n = draw(st.integers(0, 3))
    if kind == 2:
        return [_build(draw, budget - 1) for _ in range(n)]
    out: dict[Any, Any] = {}
    for _ in range(n):
        key = draw(_map_key())
        out[key.key if isinstance(key, BadKey) else key] = _build(draw, budget - 1)
    return out


@st.composite
def headers(draw: Any) -> dict[Any, Any]:
    """A small tree, sometimes with a chain of maps/lists around one subtree, past or up to the limit."""
    tree: dict[Any, Any] = {"protocol": "cryoptycho", "version": 1}
    for _ in range(draw(st.integers(0, 3))):
        tree[draw(_keys())] = _build(draw, 3)
    if draw(st.booleans()):
        chain = draw(st.integers(DOCUMENTED_DEPTH - 3, DOCUMENTED_DEPTH + 3))
        node: Any = _build(draw, 1)
        for _ in range(chain):
            node = [node] if draw(st.booleans()) else {draw(_keys()): node}
        tree[draw(_keys())] = node
    return tree


def _path(keys: list[Any]) -> str:
    """The documented path syntax: dotted map keys, ``[i]`` list indices."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def reference(tree: dict[Any, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(refusals msgpack's decoder itself makes, refusals of values it decodes), each as
    (field, rule). The decoder's refusals come first and name the header: a map key that is not
    a string or binary (``strict_map_key``; an extension type as a key is ``no_ext_types``)."""
    decoder: set[tuple[str, str]] = set()
    values: set[tuple[str, str]] = set()

    def visit(node: Any, keys: list[Any]) -> None:
        if len(keys) > DOCUMENTED_DEPTH:  # this value sits below 32 levels of maps and lists
            values.add((_path(keys), "max_depth"))
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, bytes):
                    values.add((_path(keys) or "header", "string_key"))
                elif isinstance(key, msgpack.ExtType):  # refused as the decoder reads the key
                    decoder.add(("header", "no_ext_types"))
                elif not isinstance(key, str):
                    decoder.add(("header", "msgpack"))
                if len(keys) < DOCUMENTED_DEPTH + 1:
                    visit(value, [*keys, key])
                else:
                    _decoder_only(value)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if len(keys) < DOCUMENTED_DEPTH + 1:
                    visit(value, [*keys, i])
                else:
                    _decoder_only(value)
        elif isinstance(node, (msgpack.Timestamp, msgpack.ExtType)):  # "an extension type anywhere"
            values.add((_path(keys), "no_ext_types"))
        elif isinstance(node, bytes):
            values.add((_path(keys), "no_binary"))

    def _decoder_only(node: Any) -> None:
        # below the refused depth only what the decoder refuses on its own still counts
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, msgpack.ExtType):
                    decoder.add(("header", "no_ext_types"))
                elif not isinstance(key, (str, bytes)):
                    decoder.add(("header", "msgpack"))
                _decoder_only(value)
        elif isinstance(node, list):
            for value in node:
                _decoder_only(value)

    visit(tree, [])
    return decoder, values


@settings(max_examples=400, deadline=None)
@given(headers())
def test_header_refusals_name_a_broken_rule_and_the_value_that_breaks_it(tree):
    packed = msgpack.packb(tree, use_bin_type=True)
    decoder, values = reference(tree)
    if not decoder and not values:
        read_header([packed], Limits())  # breaks no rule of §2.1: read
        event("read")
        return
    with pytest.raises(ProtocolError) as info:
        read_header([packed], Limits())
    got = (info.value.field, info.value.rule)
    event(f"refused: {got[1]}{' (of several)' if len(decoder or values) > 1 else ''}")
    assert got in (decoder or values), (got, decoder or values)
    assert info.value.field, info.value  # never an empty path
    assert str(info.value).startswith(f"{info.value.field}: ")


def test_the_reference_refuses_the_documented_cases():
    """The reference itself, on the examples PROTOCOL.md gives (so that it is not vacuous)."""
    assert reference({"metadata": {"when": msgpack.Timestamp(1)}})[1] == {("metadata.when", "no_ext_types")}
    assert reference({"a": [1, b"x"]})[1] == {("a[1]", "no_binary")}
    assert reference({"metadata": {"x": msgpack.ExtType(5, b"")}})[1] == {("metadata.x", "no_ext_types")}
    assert reference({b"k": 1})[1] == {("header", "string_key")}
    deep: Any = 1
    for _ in range(DOCUMENTED_DEPTH):
        deep = [deep]
    assert reference({"d": deep})[1] == {("d" + "[0]" * DOCUMENTED_DEPTH, "max_depth")}
    assert reference({"d": deep[0]}) == (set(), set())
