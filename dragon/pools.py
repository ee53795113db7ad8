"""Shared-memory pools (implemented in dragon._core)."""

from dragon._core.core import Block, Pool

__all__ = ["Block", "Pool"]
