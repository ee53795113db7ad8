"""The transport's frames: what a process writes into its node's gateway channel, what agents ship to each
other over MPI, and what comes back into a process's transport reply channel.

This is the data plane between nodes (one frame per user message), so it is a fixed 24-byte binary header, not
the msgpack infrastructure codec of dragon.infrastructure.messages (which travels *inside* SEND frames, as
user data, and inside CTRL frames, as the launchers' control messages). Small results (poll, len, channel
info) ride as msgpack payloads of RESULT frames.

Header ``<BBHIQQ``: kind, flags, node, n (payload bytes), sid (stream id), seq.

- From a process (gateway): ``node`` is the destination node; from an agent (MPI): frames are addressed by the
  MPI source/destination rank, ``node`` is left as the process wrote it (or names a node for NODE_DOWN).
- A stream is one (process handle, remote channel) pair: ``sid`` is random 64-bit, chosen by the process.
- OPEN: the process's pid and start time ride along, so its node's agent knows when the process is gone (by
  whatever ending) and can retire what it left: close its streams behind its last frames, put back into their
  channels the messages received for it that it never took, destroy its reply channel. BYE (at exit) says so
  at once; it is the only sign of a process in another pid namespace than the agent's.
- SEND: ``seq`` is the stream's message number (0, 1, ...); the receiving agent answers with cumulative ACKs.
- PUTBACK: a message that a receive took from a channel but nobody will take from the transport (the receive
  was abandoned, the handle closed, the process died) goes back into that channel; it carries the channel's
  sdesc, so it needs no open stream. A message taken from a channel is thus delivered or returned, never
  dropped.
- CLOSE / CLOSED: a stream's end, in order behind its frames; the channel's agent answers CLOSED (behind every
  answer it sent on the stream) to the process's agent, and that agent to the process, so each side forgets
  the stream only once nothing more can come for it.
- RECV/POLL/LEN/INFO: ``seq`` is the request id; the answer (DATA, RESULT or ERR) echoes it.
- ERR: the payload starts with the error's wire code (u16, ``dragon.errors.code_of``), then its utf-8 text.
- BIG flag: the payload is not in the MPI packet but follows as its own MPI message on TAG_BIG (in order).
- NEXT flag (agent -> process): the DATA payload is the next message of the reply channel (the agent is the
  only writer of a process's reply channel and always puts the two back to back), so ``recv_message`` of a
  remote channel hands out a Message over the pool block the payload landed in.
"""

import struct

from dragon.errors import DragonError, code_of, from_code

HDR = struct.Struct("<BBHIQQ")
HSIZE = HDR.size  # 24

# process -> agent -> remote agent
# payload: u16 len + target channel sdesc + OPENER (pid, start time) + reply channel sdesc (of the process)
OPEN = 1
SEND = 2  # payload: the message
RECV = 3  # payload: REQ (mode, max_n, maxlen, timeout)
CLOSE = 4
PUTBACK = 5  # payload: u16 len + channel sdesc + the message (flag MANY: a packed list); sid and seq unused
BYE = 6  # (gateway only) payload: the reply channel sdesc of a process that ends: its last frame
# remote agent -> agent -> process reply channel
ACK = 10  # seq: number of this stream's messages delivered so far
DATA = 11  # seq: request id; payload: one message, or (flag MANY) a packed list
RESULT = 12  # seq: request id; payload: msgpack value
ERR = 13  # seq: request id (0: the whole stream is broken); payload: ERR_CODE (dragon.errors) + utf-8 text
CLOSED = 14  # the stream's CLOSE was handled: nothing more will come for it
# agent <-> agent
NODE_DOWN = 20  # node: the node that died
CTRL = 21  # payload: an encoded infrastructure message for the launcher (LATeardown, ...): opaque here
HEARTBEAT = 22  # nothing: "still here" (an agent that hears nothing from a node for long declares it down)
LAST = 23  # nothing: the sending agent stops; no packet of it follows (its big payloads announced before may)

# flags
BIG = 1
MANY = 2
# (gateway only) the payload is a u64 offset of a block of the node's infrastructure pool holding the data
PTR = 4
NEXT = (
    8  # (reply channel only) a DATA frame whose payload is not in the frame but is the reply channel's next
)
#           message (n bytes): the process receives it as its own Message, so a big one is never copied again

# RECV modes
M_RECV, M_MANY, M_POLL, M_LEN, M_INFO, M_INTO, M_DESTROY = 0, 1, 2, 3, 4, 5, 6
REQ = struct.Struct("<BIqd")  # mode, max_n, maxlen (-1: any), timeout (-1.0: forever)
OPENER = struct.Struct(
    "<IQQ"
)  # who opened a stream: pid, start time, pid namespace (see dragon._core.remote)

# MPI tags
TAG_PKT = 7
TAG_BIG = 8

BIG_MIN = 128 * 1024  # payloads above this go as their own MPI message (no copy into a packet)
PACKET_MAX = 512 * 1024  # flush a packet to a node once it is this big

ERR_CODE = struct.Struct("<H")  # the start of an ERR payload: the error's wire code (dragon.errors.code_of)
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
U64 = struct.Struct("<Q")


def err_frame(sid, seq, err, text):
    """An ERR frame answering request ``seq`` of stream ``sid`` (0: the stream is broken): ``err`` (an
    exception or its class) travels as its dragon.errors wire code at the start of the payload, then text."""
    body = ERR_CODE.pack(code_of(err)) + text.encode(errors="replace")
    return HDR.pack(ERR, 0, 0, len(body), sid, seq) + body


def parse_err(payload):
    """(class, text) of an ERR frame's payload (a code this version does not know reads as DragonError)."""
    if len(payload) < ERR_CODE.size:
        return DragonError, "(a truncated error frame)"
    (code,) = ERR_CODE.unpack_from(payload, 0)
    return from_code(code), bytes(payload[ERR_CODE.size :]).decode(errors="replace")


def pack_many(msgs):
    """A list of messages as one payload: u32 count, then (u32 length, bytes) each."""
    parts = [U32.pack(len(msgs))]
    for x in msgs:
        parts.append(U32.pack(len(x)))
        parts.append(x)
    return b"".join(parts)


def prefix_sdesc(sdesc, rest):
    """A payload that starts with a channel's sdesc (u16 length, the sdesc) and goes on with rest: OPEN (rest:
    OPENER + reply sdesc) and PUTBACK (rest: the message, or with flag MANY a packed list)."""
    return U16.pack(len(sdesc)) + bytes(sdesc) + bytes(rest)


def split_sdesc(payload):
    """(sdesc, the rest) of a payload that starts with a u16-prefixed sdesc (OPEN, PUTBACK)."""
    (k,) = U16.unpack_from(payload, 0)
    return bytes(payload[2 : 2 + k]), payload[2 + k :]


def unpack_many(buf):
    """The messages of a pack_many payload; ValueError if it is truncated or has bytes beyond its last one."""
    mv = memoryview(buf)
    end = len(mv)
    try:
        (count,) = U32.unpack_from(mv, 0)
        pos, out = 4, []
        for _ in range(count):
            (n,) = U32.unpack_from(mv, pos)
            pos += 4
            if pos + n > end:
                raise ValueError(f"message {len(out)} of {count} is cut short")
            out.append(bytes(mv[pos : pos + n]))
            pos += n
    except struct.error as e:
        raise ValueError(f"a packed list is cut short: {e}") from None
    if pos != end:
        raise ValueError(f"{end - pos} bytes after the last of {count} packed messages")
    return out
