"""dragon.globalservices.node: the nodes of the job."""

from dragon.errors import DragonError
from dragon.infrastructure import client as _client
from dragon.infrastructure import messages as _m
from dragon.infrastructure.descriptors import NodeDescriptor

__all__ = ["get_list", "query", "NodeDescriptor"]


def get_list():
    """The index of every node of the job (0..n-1)."""
    return list(_client.call(_m.GSNodeList, DragonError))


def query(index):
    """The NodeDescriptor (index, hostname, cpus) of node ``index``; DragonError if there is no such node."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise DragonError(f"a node index is an int, not {index!r}")
    return NodeDescriptor.from_wire(_client.call(_m.GSNodeQuery, DragonError, index=index))
