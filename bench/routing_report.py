"""What the routing bench's TTFT tail consists of: each measured request joined with its
replica's access-log line (bench/routing.py runs the replicas with JSON logs and sends an
`X-Request-Id` per request), then broken down.

The access line (flora_server.observability) says whether the request's adapter was cold
(not on a device slot when the request arrived: a store load or a host-cache promotion),
its queue time (submission to admission into the running batch: waiting for a batch row or
for the adapter) and the server's own TTFT. The client's TTFT minus the server's is time
outside the handler (connection, event loop, the stream's first write).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.serverbench import nearest_rank


def access_lines(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """{request id: access fields} from replica logs written with `--log-format json`
    (lines that are not access lines are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "request_id" in record and "queue_s" in record:
                out[record["request_id"]] = record
    return out


def join_access(results: list[dict[str, Any]], lines: dict[str, dict[str, Any]]) -> None:
    """Add the server's view (`cold`, `queue_s`, `server_ttft_s`) to each result in place."""
    for r in results:
        line = lines.get(r.get("request_id", ""))
        if line is not None:
            r["cold"] = line.get("cold")
            r["queue_s"] = line.get("queue_s")
            r["server_ttft_s"] = line.get("ttft_s")


def engine_steps(warm: Sequence[Any], end: Sequence[Any]) -> list[dict[str, Any]]:
    """Per replica, its engine steps over the measured phase (two `Snapshot`s apart): how
    many, their mean and how many took over 0.32 s and over 2.56 s (a step blocks every
    running row of the replica), and merged-adapter switches (done between steps, outside
    the step times)."""
    out = []
    for w, e in zip(warm, end, strict=True):
        steps = e.steps - w.steps
        out.append(
            {
                "steps": int(steps),
                "mean_step_ms": round(1000 * (e.step_seconds - w.step_seconds) / steps, 1)
                if steps
                else None,
                "steps_over_0.32s": int(e.slow_steps - w.slow_steps),
                "steps_over_2.56s": int(e.stuck_steps - w.stuck_steps),
                "merge_switches": int(e.merge_switches - w.merge_switches),
            }
        )
    return out


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _group(rs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft"] for r in rs]
    return {
        "n": len(rs),
        "cold": sum(1 for r in rs if r.get("cold")),
        "mean_ttft_s": _mean(ttfts),
        "mean_queue_s": _mean([r["queue_s"] for r in rs if r.get("queue_s") is not None]),
        "mean_outside_server_s": _mean(
            [r["ttft"] - r["server_ttft_s"] for r in rs if r.get("server_ttft_s") is not None]
        ),
        "mean_in_flight_at_pick": _mean([r["in_flight"] for r in rs if "in_flight" in r]),
    }


def tail_breakdown(results: list[dict[str, Any]], replicas: int) -> dict[str, Any]:
    """The measured requests with a TTFT, split at the policy's own p90: cold (store load or
    promotion) or warm, mean queue time, time outside the server, how many requests the
    bench had in flight on the chosen replica when it picked it; and per replica, its
    requests and TTFT p99 (a hot spot shows as one replica's p99 and share)."""
    ok = [r for r in results if r.get("ttft") is not None]
    if not ok:
        return {}
    p90 = nearest_rank([r["ttft"] for r in ok], 0.9)
    per_replica = []
    for i in range(replicas):
        mine = [r["ttft"] for r in ok if r.get("replica") == i]
        p99 = round(nearest_rank(mine, 0.99), 4) if mine else None
        per_replica.append({"requests": len(mine), "ttft_p99_s": p99})
    return {
        "joined_access_lines": sum(1 for r in ok if "queue_s" in r),
        "above_p90": _group([r for r in ok if r["ttft"] > p90]),
        "at_or_below_p90": _group([r for r in ok if r["ttft"] <= p90]),
        "cold": _group([r for r in ok if r.get("cold")]),
        "warm": _group([r for r in ok if r.get("cold") is False]),
        "slowest_10": [
            {k: r.get(k) for k in ("ttft", "replica", "adapter", "cold", "queue_s", "in_flight")}
            for r in sorted(ok, key=lambda r: -r["ttft"])[:10]
        ],
        "per_replica": per_replica,
    }


__all__ = [
    "access_lines",
    "engine_steps",
    "join_access",
    "tail_breakdown",
]
