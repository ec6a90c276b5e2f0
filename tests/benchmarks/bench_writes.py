"""Row 3 of the performance issue: group commit.

POST /api/wants for already-Live partitions with 16 concurrent clients; each
write is acknowledged only after its event is committed (fsynced).  Compared
with GET /health throughput in the same run: health then writes, repeated,
the median of the pairs' ratios.

    python tests/benchmarks/bench_writes.py [--tiny]
"""
import json
import statistics
import tempfile
import time

import _workload as w


def main():
    args = w.parse_args(__doc__, ("--seconds", {"type": float, "default": 3.0}))
    seconds = 0.5 if args.tiny else args.seconds
    repeat = args.repeat
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-writes-") + "/ws")
    server = w.Serve(ws)
    try:
        client = server.client
        refs = ["raw/date=2025-01-%02d/n=1" % d for d in range(1, 9)]
        want = client.create_want(refs)
        while client.get_want(want["want_id"])["status"] != "Successful":
            time.sleep(0.05)
        writes = [("POST", "/api/wants", json.dumps({"partitions": [r]})) for r in refs]
        health = [("GET", "/health", None)]
        w.load(server.host, server.port, health, seconds=0.2)
        w.load(server.host, server.port, writes, seconds=0.2)
        rows = []
        for rep in range(repeat):  # pairs, so that a noisy moment hits both sides
            h = w.load(server.host, server.port, health, seconds)[0]
            wr = w.load(server.host, server.port, writes, seconds)[0]
            rows.append({"rep": rep, "health_rps": h, "writes_per_s": wr, "writes/health": wr / h})
        events = client.health()["latest_event_id"]
        acknowledged = client.list_wants(limit=0)["total"]
    finally:
        server.stop()
    ratio = statistics.median(r["writes/health"] for r in rows)
    w.report("writes", rows, {"ratio": ratio, "target": ">= 0.5", "rows": rows,
                              "wants": acknowledged, "events": events, "machine": w.machine()})


if __name__ == "__main__":
    main()
