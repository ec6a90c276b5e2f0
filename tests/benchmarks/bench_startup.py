"""Server start on a large log (README "Performance", rows 7 and 22-23).

Time from process start to the first /health answer, and RSS after start and
a first read, with a log of 10^6 events (built through the storage layer, as
the orchestrator writes it); with several sizes, one log each and the ratios
of the last to the first: memory and start-up follow the work in progress,
not the history.

    python tests/benchmarks/bench_startup.py [--tiny] [--events N[,N...]]
"""
import tempfile
import time

import _workload as w


def build(n):
    """A workspace whose log has about ``n`` events; returns (workspace, want ids, seconds)."""
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-startup-") + "/ws")
    t0 = time.perf_counter()
    want_ids = w.build_log(ws, n)
    return ws, want_ids, time.perf_counter() - t0


def start_once(ws, want_ids, rep):
    """Start the server on ``ws``: the first /health and the RSS after a first read."""
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
    return {"rep": rep, "first_health_s": first_health, "rss_mb": rss,
            "rss_after_first_read_mb": rss_after_read, "events": health["latest_event_id"]}


def main():
    args = w.parse_args(__doc__, ("--events", {
        "default": str(10**6), "help": "events of the log; several, comma-separated "
                                       "(1000000,2000000): one log each, and the ratios of "
                                       "the last to the first"}))
    sizes = [2000] if args.tiny else [int(float(n)) for n in args.events.split(",")]
    logs = [build(n) for n in sizes]
    # The starts of the sizes take turns, so that the machine's drift hits all alike.
    rows = [dict(start_once(ws, ids, rep), log_built_s=built)
            for rep in range(args.repeat) for ws, ids, built in logs]
    medians = []
    for n, (ws, ids, built) in zip(sizes, logs):
        these = [r for r in rows if r["events"] >= n and r["log_built_s"] == built]
        medians.append((sorted(r["first_health_s"] for r in these)[len(these) // 2],
                        sorted(r["rss_after_first_read_mb"] for r in these)[len(these) // 2],
                        built))
    summary = {"events": sizes[-1], "log_built_s": medians[-1][2],
               "median_first_health_s": medians[-1][0], "median_rss_mb": medians[-1][1],
               "sizes": [{"events": n, "first_health_s": m[0], "rss_mb": m[1],
                          "log_built_s": m[2]} for n, m in zip(sizes, medians)],
               "machine": w.machine(),
               "targets": {"first_health_s": "<= 1 at 10^7", "rss_mb": "<= 200 at 2*10^6",
                           "rss_ratio": "<= 1.15", "start_ratio": "<= 1.3"}}
    if len(sizes) > 1:
        summary["rss_ratio"] = medians[-1][1] / medians[0][1]
        summary["start_ratio"] = medians[-1][0] / medians[0][0]
    w.report("startup", rows, summary)


if __name__ == "__main__":
    main()
