"""dragon: processes, shared-memory pools and lock-free channels across the nodes of an HPC allocation."""

import sys as _sys

__version__ = "0.1.0"


def init(connect=None, keep=False):
    """Make this process part of a dragon runtime (start one on this node, or attach to ``dragon-launch
    --serve``'s with ``connect=FILE``); idempotent. See dragon.attach."""
    from dragon.attach import init as _init

    return _init(connect=connect, keep=keep)


def shutdown():
    """Leave the runtime init() started or attached (see dragon.attach)."""
    from dragon.attach import shutdown as _shutdown

    _shutdown()


class _RegisterStartMethod:
    """Registers multiprocessing's 'dragon' start method (dragon.mp) right after ``multiprocessing`` is
    imported.

    A meta path finder that finds nothing itself: it wraps the loader of the real ``multiprocessing`` package
    so that the registration runs once the package has executed. ``import dragon`` usually comes before
    ``import multiprocessing``, and importing multiprocessing just to register would cost every managed
    process ~10 ms (they all import dragon)."""

    def find_spec(self, name, path=None, target=None):
        if name != "multiprocessing":
            return None
        if self in _sys.meta_path:
            _sys.meta_path.remove(self)
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    self.loader = spec.loader
                    spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        _register_start_method()


def _register_start_method():
    try:
        from dragon.mp.context import register

        register()
    except Exception as e:  # never break the user's `import multiprocessing`
        import warnings

        warnings.warn(f"dragon could not register its multiprocessing start method: {e!r}", stacklevel=2)


if "multiprocessing.context" in _sys.modules:
    _register_start_method()
elif not any(isinstance(f, _RegisterStartMethod) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterStartMethod())
