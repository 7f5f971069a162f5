"""Property-based fuzzing: every decoder either returns a message or raises MalformedMessage.

Arbitrary bytes, arbitrary JSON, and near-valid messages with one field replaced.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pshare.errors import InvalidName, MalformedMessage
from p2pshare.wire import (Frame, Hello, Hit, Query, TrackerReply, TrackerRequest, decode_datagram,
                           validate_name)

EXAMPLES = settings(max_examples=1500, deadline=None)
MANY = settings(max_examples=6000, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=8,
)

VALID = [
    Query("a" * 32, "dir/f.txt", ("10.0.0.1", 1), ("", 2), 5, 1, True).encode(),
    Hit("a" * 32, "f", 10, "b" * 64, ("10.0.0.2", 3), "c" * 32, 2).encode(),
    Hello("c" * 32, (("10.0.0.1", 5),)).encode(),
    Frame("offer", id="a" * 32, name="f", size=3, sha256="b" * 64, peer="c" * 32).encode(),
    Frame("get", offset=0, length=5).encode(),
    TrackerRequest("register", 1, peer="c" * 32, udp=1, tcp=2).encode(),
    TrackerReply(1, True, peers=()).encode(),
]
DECODERS: list[Callable[[bytes], Any]] = [decode_datagram, Frame.decode, TrackerRequest.decode,
                                          TrackerReply.decode]


def decodes_or_refuses(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except MalformedMessage:
            pass


@MANY
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@EXAMPLES
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    decodes_or_refuses(json.dumps(value).encode())


@EXAMPLES
@given(st.sampled_from(VALID), st.data())
def test_valid_messages_with_one_field_replaced(message: bytes, data: st.DataObject) -> None:
    obj = json.loads(message)
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    decodes_or_refuses(json.dumps(obj).encode())


@EXAMPLES
@given(st.sampled_from(VALID), st.data())
def test_valid_messages_with_a_field_removed_or_added(message: bytes, data: st.DataObject) -> None:
    obj = json.loads(message)
    if data.draw(st.booleans()):
        obj.pop(data.draw(st.sampled_from(sorted(obj))))
    else:
        obj[data.draw(st.text(max_size=8))] = data.draw(json_values)
    decodes_or_refuses(json.dumps(obj).encode())


@MANY
@given(st.text(max_size=300))
def test_names_are_accepted_only_when_safe(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    parts = name.split("/")
    assert not name.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
    assert "\\" not in name and all(ord(c) >= 32 for c in name)
