"""A host process of the Redis-store tests, driven one JSON line at a time on stdin.

Usage: python sp_redis_host.py URL

A pool of ``sp_adapters:Stateful`` (one worker) on the session store ``URL``, named
``shared`` (so every such host shares its sessions). Each line in is a request, each
line out its answer, in order: ``{"ok": result}`` or ``{"error": type name, "kind":
..., "message": ...}``. Requests (``session`` is a session id)::

    {"op": "open", "session": id}                      create it, or attach to it
    {"op": "define", "session": id, "name": n, "type": t, "value": v}
    {"op": "set", "session": id, "values": {n: v}}     set_many
    {"op": "call", "session": id, "command": c, "args": {...}}
    {"op": "set_many_loop", "session": id, "count": k, "tag": t}
        k set_many({"a": t+i, "b": t+i}); answers the values the calls in between saw
    {"op": "watch", "session": id, "count": k}         answers once watching; collects k updates
    {"op": "watched"}                                  the updates collected (waits for all k)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import anyio.abc

import snakepool


async def serve(url: str) -> None:
    async with snakepool.Pool(
        "sp_adapters:Stateful", size=1, session_store=url, name="shared"
    ) as pool, anyio.create_task_group() as tasks:  # fmt: skip
        sessions: dict[str, snakepool.Session] = {}
        watched: list[list[Any]] = []
        watch_done = anyio.Event()

        def session(request: dict[str, Any]) -> snakepool.Session:
            found = sessions.get(request["session"])
            if found is None:
                found = sessions[request["session"]] = pool.session(request["session"])
            return found

        async def watch(
            request: dict[str, Any], *, task_status: anyio.abc.TaskStatus[None]
        ) -> None:
            async with session(request).variables.watch() as updates:
                task_status.started()
                async for update in updates:
                    watched.append([update.name, update.value, update.version])
                    if len(watched) == request["count"]:
                        break
            watch_done.set()

        async def set_many_loop(request: dict[str, Any]) -> list[list[Any]]:
            seen = []
            for i in range(request["count"]):
                value = f"{request['tag']}{i}"
                await session(request).variables.set_many({"a": value, "b": value})
                found = await session(request).call("all_vars")
                seen.append([found.get("a"), found.get("b")])
            return seen

        async def handle(request: dict[str, Any]) -> Any:
            op = request["op"]
            if op == "open":
                await session(request).open()
                return session(request).id
            if op == "define":
                await session(request).variables.define(
                    request["name"], request["type"], request["value"]
                )
                return None
            if op == "set":
                await session(request).variables.set_many(request["values"])
                return None
            if op == "call":
                return await session(request).call(request["command"], request.get("args"))
            if op == "set_many_loop":
                return await set_many_loop(request)
            if op == "watch":
                await tasks.start(watch, request)
                return "watching"
            if op == "watched":
                with anyio.fail_after(20):
                    await watch_done.wait()
                return watched
            raise ValueError(f"unknown op {op!r}")

        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            request = json.loads(line)
            try:
                answer: dict[str, Any] = {"ok": await handle(request)}
            except Exception as exc:  # reported to the test, which decides
                answer = {
                    "error": type(exc).__name__,
                    "kind": getattr(exc, "kind", None),
                    "message": str(exc),
                }
            print(json.dumps(answer), flush=True)
        tasks.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(serve, sys.argv[1])
