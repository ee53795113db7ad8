"""Global services: the user API (``process``, ``pool``, ``channel``, ``node``) and, in ``server``, the
service itself (run by dragon-launch; the client modules never import it)."""
