"""The results rendered: a terminal table, a Markdown section, a plot."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ._common import INTERLEAVED, LABELS, MiB, bandwidth_field, ratio_of


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    config = result["config"]
    header = [
        "peer",
        *(f"{c} caller{'s' if c > 1 else ''} (calls/s)" for c in config["concurrency"]),
        "seq p50 (us)",
        "seq p99 (us)",
        *(f"{s} (MB/s)" for s in config["bandwidth_sizes"]),
    ]
    rows = []
    for row in result["peers"].values():
        if row["skipped"]:
            rows.append([row["label"], f"skipped: {row['skipped']}"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                row["label"],
                *(_fmt(row["throughput"][str(c)]) for c in config["concurrency"]),
                _fmt(row["latency_us"]["p50"]),
                _fmt(row["latency_us"]["p99"]),
                *(_fmt(row["bandwidth_mb_s"][s]) for s in config["bandwidth_sizes"]),
            ]
        )
    return header, rows


def _startup_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    startup = result["startup"]
    header = ["workers", "bare interpreters (ms)", "snakepool Pool (ms)", "raw-loop workers (ms)", "snakepool / bare"]  # fmt: skip
    rows = []
    for n in result["config"]["startup_sizes"]:
        key = str(n)
        bare, sp, raw = startup["bare"].get(key), startup["snakepool"].get(key), startup["raw_loop"].get(key)  # fmt: skip
        ratio = ratio_of(sp, bare)
        rows.append(
            [
                key,
                _fmt(None if bare is None else bare * 1000),
                _fmt(None if sp is None else sp * 1000),
                _fmt(None if raw is None else raw * 1000),
                _fmt(ratio, ".2f") + ("x" if ratio is not None else ""),
            ]
        )
    return header, rows


def _verdict(check: dict[str, Any]) -> str:
    if check["passed"] is None:
        return "N/A"
    return "PASS" if check["passed"] else "FAIL"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                (cell.ljust(w) if i == 0 else cell.rjust(w))
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _interleaved_line(result: dict[str, Any]) -> str:
    data = result.get("interleaved_latency_us")
    if not data:
        return "sequential latency, interleaved rounds: not measured"
    if "error" in data:
        return f"sequential latency, interleaved rounds: failed ({data['error']})"
    parts = [
        f"{LABELS[name]} p50 {data[name]['p50']:.0f} us / p99 {data[name]['p99']:.0f} us"
        for name in INTERLEAVED
        if name in data
    ]
    line = (
        f"sequential latency, {data['rounds']} interleaved rounds ({data['calls']:,} calls "
        f"each): " + "; ".join(parts)
    )
    if data.get("callers"):
        rates = [
            f"{LABELS[name]} {data[name]['throughput']:,.0f} calls/s"
            for name in INTERLEAVED
            if "throughput" in data.get(name, {})
        ]
        line += (
            f". Then throughput at {data['callers']} callers, {data['throughput_rounds']} "
            f"alternating rounds ({data['throughput_calls']:,} calls each, median): "
            + "; ".join(rates)
        )
    for size_key in data.get("bandwidth_sizes", []):
        field = bandwidth_field(size_key)
        moved = [
            f"{LABELS[name]} {data[name][field]:,.0f} MB/s"
            for name in INTERLEAVED
            if field in data.get(name, {})
        ]
        line += (
            f". Then {size_key} bandwidth, {data['bandwidth_rounds']} alternating rounds "
            f"(median): " + "; ".join(moved)
        )
    return line


def _rss_line(rss: dict[str, Any]) -> str:
    if rss["error"]:
        return f"host RSS: failed ({rss['error']})"
    return (
        f"host RSS (snakepool, {rss['callers']} callers): {_fmt(rss['before_mib'], '.1f')} MiB after "
        f"{rss['warmup_calls']:,} warm-up calls -> {_fmt(rss['after_mib'], '.1f')} MiB after "
        f"{rss['calls']:,} more calls ({_fmt(rss['growth_mib'], '+.1f')} MiB, "
        f"{_fmt(rss['seconds'], '.0f')} s)"
    )


def _check_line(check: dict[str, Any]) -> str:
    return (
        f"{_verdict(check):4}  {check['target']}: {_fmt(check['ratio'], '.2f')} "
        f"(target {check['op']} {check['threshold']:g})"
    )


def render_text(result: dict[str, Any]) -> str:
    """The tables, the RSS line and the target checks, for a terminal."""
    machine = result["machine"]
    parts = [
        f"snakepool bench: {result['config']['workers']} workers, {machine['usable_cpus']} usable CPUs "
        f"({machine['cpu']}), Python {machine['python']}, start method {machine['start_method']}, "
        f"event loop {machine.get('event_loop', 'asyncio')}, "
        f"load average {machine['load_average_start']} -> {machine.get('load_average_end')}",
        "",
        _text_table(*_rows(result)),
        "",
        _text_table(*_startup_rows(result)),
        "",
        _interleaved_line(result),
        "",
        _rss_line(result["rss"]),
        "",
        "targets:",
        *(f"  {_check_line(c)}" for c in result["targets"]),
    ]
    notes = _notes(result)
    if notes:
        parts += ["", "notes:", *(f"  {n}" for n in notes)]
    parts.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(parts)


def _notes(result: dict[str, Any]) -> list[str]:
    notes = []
    for row in result["peers"].values():
        for key, error in row["errors"].items():
            notes.append(f"{row['label']}: {key}: {error}")
    for key, error in result["startup"]["errors"].items():
        notes.append(f"start-up {key}: {error}")
    if result["leftover_processes"]:
        notes.append(f"processes left behind: {result['leftover_processes']}")
    return notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    result: dict[str, Any], plot: str | None = None, command: str | None = None
) -> str:
    """The results as a Markdown section (machine, command, tables, plot, targets)."""
    machine = result["machine"]
    config = result["config"]
    command = command or (
        f"python stress/bench.py --workers {config['workers']} --calls {config['calls']} "
        f"--rss-calls {config['rss_calls']}"
    )
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cpu_count']} logical CPUs ({machine['usable_cpus']} usable)",
        f"- memory: {machine['memory_gib']} GiB",
        f"- {machine['implementation']} {machine['python']} on {machine['platform']}",
        f"- multiprocessing start method: {machine['start_method']}",
        f"- event loop: {machine.get('event_loop', 'asyncio')}",
        f"- load average (1, 5, 15 min) at the start: {machine['load_average_start']}, "
        f"at the end: {machine.get('load_average_end')}",
        "- versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in machine["versions"].items()),
        "",
        "## Reproduce",
        "",
        "```sh",
        command,
        "```",
        "",
        f"{config['workers']} workers for every peer; {config['calls']:,} calls per throughput point "
        f"(after a warm-up), {config['latency_calls']:,} sequential calls for the latency percentiles, "
        f"{config['bandwidth_bytes'] // MiB} MiB of payload per bandwidth size, start-up as the median "
        f"of {config['startup_repeats']} run(s).",
        "",
        "## Results",
        "",
        _md_table(*_rows(result)),
        "",
        "Throughput: N caller tasks on one asyncio loop, each awaiting one no-op call at a time. "
        "Bandwidth: sequential round trips of a `bytes` payload, payload MB (10^6 bytes) per second "
        "in each direction.",
        "",
    ]
    if plot:
        lines += [f"![no-op throughput vs concurrent callers]({plot})", ""]
    lines += [
        "### Start-up",
        "",
        _md_table(*_startup_rows(result)),
        "",
        "snakepool: until `async with Pool('generic', size=n)` is entered (every worker has "
        "imported its adapter and said hello). Bare: n `python -c` interpreters spawned at once, "
        "until each has printed one byte. Raw loop: n bare msgpack workers, until each has "
        "answered one frame.",
        "",
        "### Against the raw loop, interleaved",
        "",
        _interleaved_line(result)
        + ". The peers above are measured one after another, minutes apart; these "
        "rounds alternate between the raw loop and snakepool, so both see the same "
        "machine, and the targets against the raw loop use them.",
        "",
        "### Host memory",
        "",
        _rss_line(result["rss"]),
        "",
        "## Targets",
        "",
        _md_table(
            ["target", "ratio", "required", "result"],
            [
                [c["target"], _fmt(c["ratio"], ".2f"), f"{c['op']} {c['threshold']:g}", _verdict(c)]
                for c in result["targets"]
            ],
        ),
        "",
        "## How each peer is driven",
        "",
        *(
            f"- **{row['label']}**: {row['how'] or row['skipped']}"
            for row in result["peers"].values()
        ),
        "",
    ]
    notes = _notes(result)
    if notes:
        lines += ["## Notes from the run", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def plot_throughput(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A PNG of no-op throughput against concurrent callers, one line per peer (matplotlib)."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    concurrency = result["config"]["concurrency"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {"raw_loop": "--", "snakepool": "-", "snakepool_c8": "-"}
    for name, row in result["peers"].items():
        if row["skipped"]:
            continue
        points = [(c, row["throughput"][str(c)]) for c in concurrency]
        points = [(c, v) for c, v in points if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            styles.get(name, ":"),
            marker="o",
            linewidth=2.5 if name.startswith("snakepool") else 1.5,
            label=row["label"],
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(concurrency)
    ax.set_xticklabels([str(c) for c in concurrency])
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("no-op calls per second (log)")
    machine = result["machine"]
    ax.set_title(
        f"No-op throughput, {result['config']['workers']} workers, "
        f"{machine['usable_cpus']} CPUs, Python {machine['python']}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
