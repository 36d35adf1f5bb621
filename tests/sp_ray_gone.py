"""A host whose Ray cluster goes away entirely (run as a script by test_ray_gone.py:
the driver of a vanished cluster is better isolated from pytest's process)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import anyio
import psutil

import snakepool

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
from ray.cluster_utils import Cluster


async def main() -> dict[str, object]:
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    address = cluster.address
    pool = snakepool.Pool(
        "sp_adapters:Stateful", size=2, backend="ray", ray={"address": address, "num_cpus": 0}
    )
    await pool.start()
    report: dict[str, object] = {"address": address, "first": await pool.call("echo", {"value": 1})}
    ours = psutil.Process().children(recursive=True)  # the cluster's processes (and workers)
    for gone in [*cluster.worker_nodes, cluster.head_node]:  # every process of it, at once
        gone.kill_all_processes(check_alive=False, allow_graceful=False)
    started = time.monotonic()
    with anyio.fail_after(30):  # (calls already on their way may still be answered)
        while pool.state != "broken":
            await anyio.sleep(0.05)
    report["broken_after"] = time.monotonic() - started
    outcomes = []
    for _ in range(3):
        try:
            with anyio.fail_after(60):
                outcomes.append(["ok", await pool.call("echo", {"value": 2})])
        except Exception as exc:  # what the caller sees, kind and text
            outcomes.append([getattr(exc, "kind", type(exc).__name__), str(exc)])
    report["outcomes"] = outcomes
    report["state"] = pool.state
    closing = time.monotonic()
    with anyio.fail_after(30):
        await pool.aclose()
    report["aclose_seconds"] = time.monotonic() - closing
    # Ray's node agents outlive a raylet killed so (they notice later): not ours to leave.
    for process in ours:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return report


if __name__ == "__main__":
    print("REPORT " + json.dumps(anyio.run(main)), flush=True)
    # (now: a Ray driver whose cluster is gone is ended by Ray after 60 s anyway)
    os._exit(0)
