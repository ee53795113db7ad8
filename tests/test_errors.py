"""The one error-code registry (dragon.errors): fixed explicit codes, from_code/code_of, and the two wires
that carry them (Response.err of the infrastructure messages, the ERR frames of the transport)."""

import inspect

import pytest

from dragon import errors
from dragon._core import frames as W
from dragon.infrastructure import messages as m

CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.DragonError)]

# The wire ids never change meaning: a runtime of one version must read another's.
STABLE = {
    "DragonError": 1,
    "RuntimeNotFound": 2,
    "NotSupported": 5,
    "PoolError": 10,
    "PoolFull": 11,
    "PoolTimeout": 12,
    "ChannelError": 20,
    "ChannelFull": 21,
    "ChannelEmpty": 22,
    "ChannelTimeout": 23,
    "ProcessError": 30,
    "ProcessTimeout": 31,
}


def test_every_class_has_its_own_explicit_stable_code():
    assert {c.__name__: c.__dict__["CODE"] for c in CLASSES} == STABLE  # set in each body, never inherited
    for c in CLASSES:
        assert errors.from_code(c.CODE) is c and errors.code_of(c) == c.CODE == errors.code_of(c("x"))
        assert f"{c.CODE} {c.__name__}" in errors.__doc__  # documented


def test_unknown_codes_and_foreign_exceptions():
    assert errors.from_code(9999) is errors.DragonError  # a newer peer's class
    assert errors.from_code(0) is errors.DragonError
    assert errors.code_of(KeyError("k")) == errors.DragonError.CODE

    class Mine(errors.ChannelTimeout):  # a user's subclass travels as its nearest dragon class
        CODE = 3

    assert errors.code_of(Mine) == errors.ChannelTimeout.CODE and errors.from_code(3) is errors.DragonError


def test_a_class_of_the_registry_without_a_code_or_with_a_taken_one_is_refused():
    for body in ({}, {"CODE": 20}, {"CODE": 0}, {"CODE": True}):
        with pytest.raises(TypeError):
            type("Bad", (errors.DragonError,), {"__module__": errors.__name__, **body})


def test_response_err_carries_registry_codes():
    """A service answers the error a handler raised with its class's code (0 is no error), and the client
    raises the class back (dragon.infrastructure.service, .client)."""
    assert not any(c.CODE == 0 for c in CLASSES)
    for cls in CLASSES:
        resp = m.decode(m.encode(m.Response(1, errors.code_of(cls("x")), "x", None)))
        assert errors.from_code(resp.err) is cls


def test_err_frames_carry_the_code_in_the_payload_not_the_header():
    for cls in CLASSES:
        frame = W.err_frame(7, 9, cls, "näh")
        kind, flags, node, n, sid, seq = W.HDR.unpack_from(frame)
        assert (kind, flags, node, n, sid, seq) == (W.ERR, 0, 0, len(frame) - W.HSIZE, 7, 9)
        assert W.parse_err(frame[W.HSIZE :]) == (cls, "näh")
    assert W.parse_err(W.err_frame(1, 1, errors.ChannelEmpty("x"), "")[W.HSIZE :]) == (
        errors.ChannelEmpty,
        "",
    )
    assert W.parse_err(b"\x01")[0] is errors.DragonError  # truncated: no crash
    assert W.parse_err(W.ERR_CODE.pack(60000) + b"\xff")[0] is errors.DragonError
