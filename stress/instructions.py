"""Instructions per call, counted by valgrind: the same number run after run.

Timings on this shared 2-CPU VM drift by tens of percent from one minute to
the next; an instruction count does not. This counts, with ``valgrind
--tool=callgrind``, the instructions one process executes per call, as the
difference between a run of N calls and a run of none (start-up cancels out):

- ``host``: the host process of ``Pool("generic", size=2)`` making sequential
  ``echo`` calls (its workers run natively, not under valgrind);
- ``worker``: one worker process (``python -m snakepool.workers``) fed batches
  of 32 calls over its pipes: plain calls of a no-op, and session calls whose
  handler reads ``ctx.variables`` (32 sessions, synced once; the adapter of
  ``stress/session_calls.py``).

Each SRC is a source tree (its ``src`` folder); the same one twice gives the
same numbers to within a few dozen instructions. Needs valgrind (``apt-get
install valgrind``). Instructions are not time (a cache miss costs more than
an add), but a change that removes work shows here first and for sure.

Run::

    python stress/instructions.py [--calls 4000] [--what host|worker|both] SRC [SRC ...]

for example ``python stress/instructions.py $(git worktree add -f /tmp/old 600fe21 >/dev/null;
echo /tmp/old/src) src``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from session_calls import ADAPTER_SOURCE  # (noop, and read of ctx.variables)

REPO = Path(__file__).resolve().parents[1]
HOST = """
import asyncio, sys
from snakepool import Pool
async def main(n):
    async with Pool("generic", size=2) as pool:
        for _ in range(200):
            await pool.call("echo", {"value": 1})
        for _ in range(n):
            await pool.call("echo", {"value": 1})
asyncio.run(main(int(sys.argv[1])))
"""

WORKER = """
import os, sys
from snakepool import protocol as p
kind, n, folder, src, valgrind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
proc = __import__("subprocess").Popen(  # (this driver speaks with this checkout's protocol)
    [*valgrind, sys.executable, "-m", "snakepool.workers"], stdin=-1, stdout=-1, stderr=-3,
    env={**os.environ, "PYTHONPATH": src},
)
host = p.Connection(p.Role.HOST)
def send(data):
    proc.stdin.write(data); proc.stdin.flush()
def answers(k):
    while k:
        for m in host.receive_data(os.read(proc.stdout.fileno(), 1 << 20)):
            if isinstance(m, p.Failure):
                raise SystemExit(m.message)
            k -= isinstance(m, (p.Result, p.Hello))
send(host.send(p.Init(version=p.PROTOCOL_VERSION, worker_id=0, pool="b",
                      adapter="session_bench:SessionBench", sys_path=[folder])))
answers(1)
for s in range(32):
    send(host.send(p.SessionSync(session_id=f"s{s}", version=1,
                                 variables={"temperature": 0.5, "top_k": 40})))
ids = iter(range(1, 10**9))
def batch(kind):
    if kind == "plain":
        calls = [p.Call(next(ids), "noop", {"value": 1}) for _ in range(32)]
    else:
        calls = [p.Call(next(ids), "read", {}, session_id=f"s{i}") for i in range(32)]
    send(b"".join(map(host.send, calls)))
    answers(32)
for warm in ("plain", "session") * 4:
    batch(warm)
for _ in range(n // 32):
    batch(kind)
proc.stdin.close()
proc.wait()
"""


def _instructions(out: Path) -> int:
    match = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no instruction count in {out}")
    return int(match.group(1))


def _run(src: Path, folder: Path, script: str, args: list[str], *, worker: bool) -> int:
    out = folder / "callgrind.out"
    out.unlink(missing_ok=True)
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-c", script, *args]
    if worker:  # (the driver runs natively, on this checkout; the worker, under valgrind)
        env["PYTHONPATH"] = str(REPO / "src")
        command += [str(folder), str(src), *valgrind]
    else:
        command = [*valgrind, *command]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return _instructions(out)


def per_call(src: Path, what: str, calls: int) -> dict[str, int]:
    """Instructions per call of ``what`` (host, worker) for the tree ``src``."""
    found: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "session_bench.py").write_text(ADAPTER_SOURCE)  # (session_calls.py's)
        if what in ("host", "both"):
            none = _run(src, folder, HOST, ["0"], worker=False)
            found["host, sequential echo"] = (
                _run(src, folder, HOST, [str(calls)], worker=False) - none
            ) // calls
        if what in ("worker", "both"):
            none = _run(src, folder, WORKER, ["plain", "0"], worker=True)
            for kind in ("plain", "session"):
                total = _run(src, folder, WORKER, [kind, str(calls)], worker=True)
                found[f"worker, {kind} call"] = (total - none) // (calls // 32 * 32)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="+", type=Path, help="source trees (their src folders)")
    parser.add_argument("--calls", type=int, default=4000, help="calls per count (4000)")
    parser.add_argument("--what", choices=("host", "worker", "both"), default="both")
    options = parser.parse_args()
    rows = {src: per_call(src.resolve(), options.what, options.calls) for src in options.src}
    names = list(next(iter(rows.values())))
    print(f"instructions per call (valgrind), {options.calls} calls")
    print(f"{'':28}" + "".join(f"{str(src)[-24:]:>26}" for src in rows))
    for name in names:
        print(f"{name:28}" + "".join(f"{rows[src][name]:>26,}" for src in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
