SDESC_VERSION = 2
cdef bytes SD_MAGIC = b"DRGN"
cdef int SD_POOL = 1
cdef int SD_CHANNEL = 2
# magic, version, kind, name length, pool generation, pool size, channel offset, channel generation, node (the
# index of the node whose /dev/shm holds the segment); then name
_SD = struct.Struct("<4sBBHQQQQH")


def local_node():
    """The index of the node this process runs on: env DRAGON_NODE (set by the runtime), default 0."""
    try:
        node = int(os.environ.get(_env.NODE) or 0)
    except ValueError:
        return 0
    return node if 0 <= node <= 0xFFFF else 0


def sdesc_info(sdesc):
    """(node, pool size) of what sdesc (a pool's or a channel's) names: the index of the node whose /dev/shm
    holds it, and the bytes of its pool's data (no message or block bigger can ever be in it); ChannelError
    for bytes that are not an sdesc. For what cannot map the segment: the transport agent checks the node
    before it attaches a channel for another node's process (one of a third node would be attached through
    its own agent, waiting on itself), a handle to a channel of another node refuses what its pool can never
    hold."""
    kind, name, pgen, psize, choff, chgen, node = _parse_sdesc(sdesc, ChannelError)
    return node, psize


cdef tuple _parse_sdesc(object sdesc, object err):
    if not isinstance(sdesc, (bytes, bytearray, memoryview)):
        raise TypeError(f"sdesc must be bytes, not {type(sdesc).__name__}")
    sdesc = bytes(sdesc)
    if len(sdesc) < _SD.size:
        raise err(f"truncated sdesc ({len(sdesc)} bytes)")
    magic, version, kind, namelen, pgen, psize, choff, chgen, node = _SD.unpack_from(sdesc)
    if magic != SD_MAGIC:
        raise err("not a dragon sdesc (bad magic)")
    if version != SDESC_VERSION:
        raise err(f"unsupported sdesc version {version}")
    if len(sdesc) != _SD.size + namelen:
        raise err(f"truncated or oversized sdesc ({len(sdesc)} bytes, expected {_SD.size + namelen})")
    try:
        name = sdesc[_SD.size:].decode()
    except UnicodeDecodeError:
        raise err("corrupt sdesc (segment name is not UTF-8)") from None
    if not name.startswith("dragon-") or "/" in name or "\0" in name or len(sdesc) - _SD.size > NAME_MAX:
        raise err(f"corrupt sdesc (bad segment name {name!r})")
    return kind, name, pgen, psize, choff, chgen, node
