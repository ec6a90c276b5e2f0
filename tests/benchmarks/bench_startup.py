"""Row 7 of the performance issue: server start on a large log.

Time from process start to the first /health answer, and RSS after start,
with a log of 10^6 events (built through the storage layer).

    python tests/benchmarks/bench_startup.py [--tiny] [--events N]
"""
import tempfile
import time

import _workload as w


def main():
    args = w.parse_args(__doc__, ("--events", {"type": int, "default": 10**6}))
    n = 2000 if args.tiny else args.events
    repeat = args.repeat
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-startup-") + "/ws")
    t0 = time.perf_counter()
    want_ids = w.build_log(ws, n)
    built_in = time.perf_counter() - t0
    rows = []
    for rep in range(repeat):
        t0 = time.perf_counter()
        server = w.Serve(ws)
        try:
            client = server.client
            health = client.health()
            first_health = time.perf_counter() - t0
            rss = server.rss_mb()
            assert client.get_want(want_ids[-1])["want_id"] == want_ids[-1]
            rss_after_read = server.rss_mb()
        finally:
            server.stop()
        rows.append({"rep": rep, "first_health_s": first_health, "rss_mb": rss,
                     "rss_after_first_read_mb": rss_after_read,
                     "events": health["latest_event_id"]})
    firsts = sorted(r["first_health_s"] for r in rows)
    rss = sorted(r["rss_after_first_read_mb"] for r in rows)
    w.report("startup", rows, {"events": n, "log_built_s": built_in,
                               "median_first_health_s": firsts[len(firsts) // 2],
                               "median_rss_mb": rss[len(rss) // 2],
                               "targets": {"first_health_s": "<= 3", "rss_mb": "<= 500"},
                               "machine": w.machine()})


if __name__ == "__main__":
    main()
