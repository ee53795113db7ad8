"""Local services: the per-node shepherd (``shepherd``), run by dragon-launch."""
