"""Rows 1 and 2 of the performance issue: read throughput against log size.

GET /api/wants?limit=50 and GET /api/wants/<id> with 16 concurrent keep-alive
clients, on logs of 10^3, 10^5 and 10^6 events built through the storage layer
(a realistic mix, see _workload.build_log), and GET /health in the same run.
Besides, the latency of one client asking ``explain`` and ``lineage`` of
partitions (lineage issue: milliseconds on 10^6 events, no scan of the log).

    python tests/benchmarks/bench_reads.py            # full size (several minutes)
    python tests/benchmarks/bench_reads.py --tiny     # seconds: CI runs this
"""
import statistics
import tempfile
import time

import _workload as w


def latency_ms(call, items, repeat=3):
    """Median milliseconds of ``call(item)``, one request at a time."""
    times = []
    for _ in range(repeat):
        for item in items:
            t0 = time.perf_counter()
            call(item)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main():
    args = w.parse_args(__doc__, ("--sizes", {"type": int, "nargs": "*", "default": None}),
                        ("--seconds", {"type": float, "default": 3.0,
                                       "help": "per measurement"}))
    sizes = args.sizes or ([1000, 3000] if args.tiny else [10**3, 10**5, 10**6])
    seconds = 0.5 if args.tiny else args.seconds
    repeat = args.repeat
    rows, by_size = [], {}
    for n in sizes:
        ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-reads-") + "/ws")
        want_ids = w.build_log(ws, n)
        server = w.Serve(ws)
        try:
            sample = want_ids[:: max(1, len(want_ids) // 500)]
            workloads = {
                "health": [("GET", "/health", None)],
                "list": [("GET", "/api/wants?limit=50", None)],
                "get": [("GET", "/api/wants/" + i, None) for i in sample],
            }
            for reqs in workloads.values():  # warm up
                w.load(server.host, server.port, reqs, seconds=0.2)
            figures = {}
            for name, reqs in workloads.items():
                med, _ = w.median_of(lambda: w.load(server.host, server.port, reqs,
                                                    seconds=seconds)[0], repeat)
                figures[name] = med
            refs = [p["ref"] for p in server.client.list_partitions(
                prefix="daily/", limit=100)["data"]][::5]
            explain_ms = latency_ms(server.client.explain, refs)
            lineage_ms = latency_ms(server.client.lineage, refs)
            rss = server.rss_mb()
        finally:
            server.stop()
        by_size[n] = figures
        rows.append({"events": n, "health_rps": figures["health"],
                     "list50_rps": figures["list"], "get_rps": figures["get"],
                     "get/health": figures["get"] / figures["health"],
                     "explain_ms": explain_ms, "lineage_ms": lineage_ms, "rss_mb": rss})
    small, large = min(sizes), max(sizes)
    summary = {
        "sizes": sizes, "machine": w.machine(),
        "list_ratio_large_small": by_size[large]["list"] / by_size[small]["list"],
        "get_ratio_large_small": by_size[large]["get"] / by_size[small]["get"],
        "get_over_health_large": by_size[large]["get"] / by_size[large]["health"],
        "explain_ms_large": rows[-1]["explain_ms"], "lineage_ms_large": rows[-1]["lineage_ms"],
        "targets": {"ratio_large_small": ">= 0.8", "get_over_health": ">= 0.6"},
        "rows": rows,
    }
    w.report("reads", rows, summary)


if __name__ == "__main__":
    main()
