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
