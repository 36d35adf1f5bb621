"""Opening a session store by name: ``"memory"``, a ``redis://`` URL, or an instance.

Its own module so that the store interface (``_store``) and the stores built
on it (``_redis_store``) do not import each other.
"""

from __future__ import annotations

from ._store import MemorySessionStore, SessionStore

__all__ = ["open_store"]


def open_store(spec: str | SessionStore, *, namespace: str) -> SessionStore:
    """``"memory"``, a ``redis://`` URL, or a store instance."""
    if isinstance(spec, SessionStore):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"session_store must be 'memory', a redis:// URL or a SessionStore, got {type(spec).__name__}"
        )
    if spec == "memory":
        return MemorySessionStore()
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from ._redis_store import RedisSessionStore

        return RedisSessionStore(spec, namespace=namespace)
    raise ValueError(f"session_store must be 'memory' or a redis:// URL, got {spec!r}")
