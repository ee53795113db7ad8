"""The message module: fixed type ids, declared field types checked at decode, one codec, bad bytes (no
runtime needed)."""

import os
import random
from typing import Any, Union, get_args, get_origin

import msgpack
import pytest

from dragon.infrastructure import messages as m


def sample(tp, rng):
    """A value of the declared type tp."""
    if tp is Any:
        return {"k": [1, b"\x00bin", None, "s"]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return sample(rng.choice(args), rng)
    if tp is type(None):
        return None
    if origin is list:
        return [sample(args[0], rng) for _ in range(2)]
    if origin is dict:
        return {sample(args[0], rng): sample(args[1], rng)}
    return {int: 7, float: 1.5, str: "s\u00e9", bytes: b"\x00b", bool: True, list: [1], dict: {"a": 1}}[tp]


def valid(cls, rng):
    return cls(*[sample(m._hints(cls)[f], rng) for f in cls.FIELDS])


def test_type_ids_unique_and_fixed():
    table = m.type_table()
    assert len(table) == len({c.__name__ for c in table.values()})
    assert all(isinstance(k, int) and cls.TYPE == k for k, cls in table.items())
    # ids are part of the wire format: they must never change meaning
    assert (m.Response.TYPE, m.GSProcessCreate.TYPE, m.SHProcessExit.TYPE, m.LAHeadExit.TYPE) == (
        1,
        10,
        66,
        51,
    )


def test_round_trip_every_message_with_values_of_its_declared_types():
    rng = random.Random(1)
    for cls in m.type_table().values():
        for _ in range(5):
            msg = valid(cls, rng)
            back = m.decode(m.encode(msg))
            assert type(back) is cls and back == msg


def test_control_messages_carry_the_jobs_key_first():
    for cls in m.type_table().values():
        assert cls.CONTROL == (cls.FIELDS[:1] == ("key",)), cls
    assert m.SHProcessExit.CONTROL and m.GSHalt.CONTROL and m.LAHeadExit.CONTROL and m.GSNodeDown.CONTROL
    assert not m.GSProcessQuery.CONTROL and not m.Response.CONTROL


def test_fields():
    msg = m.GSProcessJoin(tag=3, ident="x", timeout=1.5)
    assert msg.reply is None and msg.caller is None and msg.ident == "x"
    with pytest.raises(TypeError):
        m.GSProcessJoin(bogus=1)
    with pytest.raises(TypeError):
        m.Response(1, 2, 3, 4, 5)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        b"\x91\xcd\x27\x0f",
        b"\x92\x01\x02",
        b"\x84\x00B\x01\x00\x02\x00\x03\x00",  # map-shaped: {0: 66, 1: 0, 2: 0, 3: 0} (a TypeError before)
        msgpack.packb("not a list"),
        msgpack.packb([]),
        msgpack.packb(["66", 1, 2, 3]),
        msgpack.packb([1.5, 1]),
    ],
)
def test_decode_rejects_garbage_with_valueerror_only(data):
    with pytest.raises(ValueError):
        m.decode(data)


def test_a_field_of_the_wrong_type_is_refused_naming_it_and_the_message_is_kept_for_an_answer():
    good = m.GSProcessQuery(tag=1, reply=b"r", caller=0, ident=5)
    for bad_value in ([1], {"a": 1}, 1.5, None, True, b"x"):
        wire = good._wire()
        wire[-1] = bad_value
        with pytest.raises(m.BadMessage, match="GSProcessQuery.ident") as e:
            m.decode(msgpack.packb(wire, use_bin_type=True))
        assert e.value.msg.tag == 1 and e.value.msg.reply == b"r"  # (the service can still answer it)
    wire = good._wire()
    wire[1] = "tag"
    with pytest.raises(ValueError, match="GSProcessQuery.tag"):
        m.decode(msgpack.packb(wire))


def test_fuzzed_bytes_never_raise_anything_but_valueerror():
    rng = random.Random(7)
    known = [m.encode(valid(cls, rng)) for cls in m.type_table().values()]
    for _i in range(20000):
        data = bytearray(rng.choice(known))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.75:
                data = data[: rng.randrange(len(data) + 1)]
            else:
                data += os.urandom(rng.randint(1, 8))
        try:
            m.decode(bytes(data))
        except ValueError:
            pass


def test_launcher_control_messages():
    # what the launchers of a multi-node job send each other through the transport agents' CTRL frames
    assert (m.LATeardown.TYPE, m.LATorn.TYPE, m.LAExit.TYPE, m.LABye.TYPE, m.LANodeDead.TYPE) == (
        70,
        71,
        72,
        73,
        74,
    )
    assert m.LAProgramDone.TYPE == 75
    key = b"k" * 8
    for msg in (
        m.LATeardown(key=key, grace=2.5),
        m.LATorn(key=key, node=3),
        m.LAExit(key=key),
        m.LABye(key=key, node=1),
        m.LANodeDead(
            key=key, node=2, why="local services (shepherd) of node 2 (pid 77) died (killed by SIGKILL)"
        ),
        m.LAProgramDone(key=key, node=1, exit_code=-9),
    ):
        data = m.encode(msg)
        assert data[1] == msg.TYPE  # msgpack fixarray, then the type id as a positive fixint
        back = m.decode(memoryview(data))  # the agent hands the decoder a view of its receive buffer
        assert type(back) is type(msg) and back == msg
    assert m.LATeardown().grace is None
    with pytest.raises(ValueError, match="LATorn: 3 fields"):
        m.decode(msgpack.packb([71, key, 1, 2]))  # an LATorn with one field too many
