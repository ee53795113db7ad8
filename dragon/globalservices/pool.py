"""dragon.globalservices.pool: shared-memory pools managed by global services (the spec's Pool Services).

Use a pool by attaching to it: ``dragon.pools.Pool.attach(desc.sdesc)``. Each node's infrastructure pool is
listed too (named ``dragon_infra_<node>``); it can hold user channels but cannot be destroyed.
"""

from dragon.errors import PoolError
from dragon.infrastructure import checks
from dragon.infrastructure import client as _client
from dragon.infrastructure import messages as _m
from dragon.infrastructure.descriptors import PoolDescriptor, PoolOptions

__all__ = ["create", "get_list", "query", "destroy", "PoolDescriptor", "PoolOptions", "PoolError"]


def create(size, user_name=None, pool_options=None, soft=False):
    """Make a pool of ``size`` bytes on the caller's node (or ``PoolOptions(node=k)``); the name, if given,
    must be unique (``soft=True`` returns the existing pool of that name). Returns a PoolDescriptor."""
    checks.positive_int(size, PoolError, "pool size")
    checks.name_soft(user_name, soft, PoolError)
    opts = PoolOptions.make(pool_options)
    return PoolDescriptor.from_wire(
        _client.call(
            _m.GSPoolCreate,
            PoolError,
            size=size,
            user_name=user_name or None,
            options=opts.to_wire(),
            soft=soft,
        )
    )


def get_list():
    """The m_uid of every pool currently alive."""
    return list(_client.call(_m.GSPoolList, PoolError))


def query(identifier):
    """The PoolDescriptor of a pool by m_uid (int) or name (str); PoolError if there is none."""
    return PoolDescriptor.from_wire(
        _client.call(_m.GSPoolQuery, PoolError, ident=checks.ident(identifier, PoolError, "pool", "m_uid"))
    )


def destroy(identifier):
    """Destroy a pool. PoolError if it is unknown, still holds channels, or belongs to the runtime."""
    _client.call(_m.GSPoolDestroy, PoolError, ident=checks.ident(identifier, PoolError, "pool", "m_uid"))
