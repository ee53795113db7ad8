"""dragon.mp: the ``dragon`` start method of multiprocessing (processes, queues, pipes, locks, shared values,
a pool) across every node of a dragon runtime.

``import dragon`` registers the start method; then, in a program run by ``dragon-launch``::

    import dragon, multiprocessing as mp
    mp.set_start_method("dragon")        # or: ctx = mp.get_context("dragon"); ctx.Pool(...), ctx.Queue() ...

A Process is a managed process of the runtime, placed round-robin over the nodes (``ctx.Process(..., node=k)``
or ``with dragon.mp.placement(node=k):`` chooses). Queues, pipes and locks are dragon channels; shared values
live in a pool on their creator's node. Every object lives as long as the process that made it. See README.md
("multiprocessing") for what differs from the stdlib's start methods.

``import dragon`` registers the start method when multiprocessing is imported (see ``dragon/__init__.py``);
the implementation here is imported only when multiprocessing asks for it.
"""

__all__ = ["DragonContext", "Process", "placement"]


def __getattr__(name):
    if name in __all__:
        from dragon.mp import context

        return getattr(context, {"Process": "DragonProcess"}.get(name, name))
    raise AttributeError(f"module 'dragon.mp' has no attribute {name!r}")
