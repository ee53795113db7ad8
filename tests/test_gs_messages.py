"""The message module: fixed type ids, one codec, routing, bad bytes (no runtime needed)."""

import pytest

from dragon.infrastructure import messages as m


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


def test_round_trip_every_message():
    for cls in m.type_table().values():
        msg = cls(*[{"k": [i, b"\x00bin", None, "s"]} for i in range(len(cls.FIELDS))])
        back = m.decode(m.encode(msg))
        assert type(back) is cls and back == msg


def test_fields_and_routing():
    msg = m.GSProcessJoin(tag=3, ident="x", timeout=1.5)
    assert msg.reply is None and msg.caller is None and msg.ident == "x"
    with pytest.raises(TypeError):
        m.GSProcessJoin(bogus=1)
    with pytest.raises(TypeError):
        m.Response(1, 2, 3, 4, 5)
    assert m.route({m.GSProcessJoin: lambda x: x.timeout}, msg) == 1.5
    with pytest.raises(KeyError, match="GSProcessJoin"):
        m.route({}, msg)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x91\xcd\x27\x0f", b"\x92\x01\x02"])
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError):
        m.decode(data)


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
    for msg in (
        m.LATeardown(grace=2.5),
        m.LATorn(node=3),
        m.LAExit(),
        m.LABye(),
        m.LANodeDead(node=2, why="local services (shepherd) of node 2 (pid 77) died (killed by SIGKILL)"),
        m.LAProgramDone(node=1, exit_code=-9),
    ):
        data = m.encode(msg)
        assert data[1] == msg.TYPE  # msgpack fixarray, then the type id as a positive fixint
        back = m.decode(memoryview(data))  # the agent hands the decoder a view of its receive buffer
        assert type(back) is type(msg) and back == msg
    assert m.LATeardown().grace is None
    assert m.decode(m.encode(m.LAExit())) != m.LABye()
    with pytest.raises(ValueError, match="LATorn: 2 fields"):
        m.decode(b"\x93\x47\x01\x02")  # [71, 1, 2]: an LATorn with one field too many
