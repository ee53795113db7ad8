"""What every part of the runtime shares (imports only dragon._core and the leaves dragon.errors, dragon.env):

- ``messages``: every infrastructure message, its fixed type id, the one codec (msgpack).
- ``descriptors``: ProcessDescriptor, PoolDescriptor, ChannelDescriptor, NodeDescriptor and the options
  objects.
- ``client``: the thread-safe request helper the user API uses to talk to global services.
- ``log``: the services' stderr logging.
"""
