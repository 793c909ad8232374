"""``resilient status``: the event journal as a timeline."""

from __future__ import annotations

import json
import time
from typing import Any

from resilient.journal import JournalContents

_SKIP = {"time", "event", "host", "pid", "rank", "attempt", "source"}


def _mb(count: Any) -> str:
    try:
        return f"{int(count) / 1e6:.1f} MB"
    except (TypeError, ValueError):
        return "? MB"


def _command(words: Any) -> str:
    text = " ".join(str(word) for word in words) if isinstance(words, list) else str(words)
    return text if len(text) <= 70 else text[:67] + "..."


def _fields(event: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in event.items() if key not in _SKIP)


def describe(event: dict[str, Any]) -> str:
    """Describe an event in one sentence. Unknown kinds, and known kinds with odd fields, list their fields."""
    try:
        return _sentence(event)
    except (TypeError, ValueError, AttributeError, KeyError):
        return _fields(event)


def _sentence(event: dict[str, Any]) -> str:
    kind, get = event["event"], event.get
    if kind == "start":
        return f"started pid {get('child_pid')}: {_command(get('command'))}"
    if kind == "resume":
        restart = f" after torchrun restart {get('torchelastic_restart')}" if get("torchelastic_restart") else ""
        if get("checkpoint"):
            return f"resumed at step {get('step')} from {get('checkpoint')}{restart}"
        return f"started at step 0, no checkpoint yet{restart}"
    if kind == "signal":
        if "relayed_to" in event:
            targets = get("relayed_to") or []
            return f"{get('signal')} received; relayed to {len(targets)} processes {targets}"
        return f"{get('signal')} received"
    if kind == "stop":
        return f"all ranks agreed to stop after step {get('step')} ({get('reason')})"
    if kind == "checkpoint":
        return f"committed step {get('step')} ({get('reason')}): {_mb(get('bytes'))} in {get('seconds')} s"
    if kind == "hang":
        text = f"no progress for {get('idle_seconds')} s; stacks of ranks {get('ranks_with_stacks')} in " \
               f"{get('stacks_dir')}"
        if get("stopped_pids"):
            text += f"; stopped pids {get('stopped_pids')}"
        return text
    if kind == "kill":
        processes = get("processes") or []
        pids = ", ".join(str(item.get("pid")) for item in processes if isinstance(item, dict))
        return f"SIGKILLed {len(processes)} processes ({pids}): {get('why')}"
    if kind == "exit":
        return f"command exited: {get('outcome')}, status {get('status')}"
    if kind == "restart":
        return f"restart {get('restart')} of {get('max_restarts')} in {get('delay')} s after {get('reason')}"
    if kind == "startup_failure":
        return f"failed before the first step in two attempts in a row (status {get('status')}); not restarted"
    if kind == "requeue":
        return f"scontrol requeue {get('target')}: {'accepted' if get('accepted') else 'failed'}"
    if kind == "finish":
        return f"resilient run exited {get('status')} ({get('outcome')})"
    return _fields(event)


def _source(event: dict[str, Any]) -> str:
    if event.get("source") == "launcher":
        return f"run {event.get('host')}:{event.get('pid')}"
    if event.get("rank") is not None:
        return f"rank {event.get('rank')}"
    return f"{event.get('host')}:{event.get('pid')}"


def _when(seconds: Any) -> str:
    try:
        stamp = float(seconds)
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"
    except (TypeError, ValueError, OverflowError, OSError):
        return f"? ({seconds!r})"


def render_table(contents: JournalContents) -> str:
    rows = [(_when(event.get("time")), str(event.get("attempt", "-")), _source(event), event["event"],
             describe(event)) for event in contents.events]
    header = ("TIME (UTC)", "ATTEMPT", "SOURCE", "EVENT", "DETAILS")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
             for row in [header, *rows]]
    if contents.skipped_lines:
        lines.append(f"({contents.skipped_lines} unreadable lines skipped)")
    return "\n".join(lines)


def render_json(contents: JournalContents) -> str:
    return json.dumps({"events": contents.events, "skipped_lines": contents.skipped_lines}, indent=2)
