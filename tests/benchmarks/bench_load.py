"""A mixed load: 16 keep-alive clients sending reads of every kind, writes
(new wants, repeated want ids, taints) and bad requests, for a while.

Prints the requests answered, the answers that were not the expected ones
(the figure that must be 0: no 5xx, no unexpected 4xx) and requests/s.
Meanwhile a writer wants new partitions all the time (``--new-per-second``,
built by a trivial job: history that grows), and the server's RSS is sampled
every 5 s: ``rss_slope_mb_per_min`` (least squares, after the first minute,
or the first half of a short run) says whether memory follows the history
or stays flat (README "Performance", row 24).  ``backlog_max`` (partitions
wanted and not yet Live, sampled with the RSS) says whether the server kept
up: a growing backlog is work in progress, which memory rightly follows.

    python tests/benchmarks/bench_load.py [--tiny] [--seconds S] [--new-per-second N]
"""
import json
import tempfile
import threading
import time

import _workload as w


def main():
    args = w.parse_args(__doc__, ("--seconds", {"type": float, "default": 20.0}),
                        ("--new-per-second", {"type": float, "default": 100.0}))
    seconds = 1.0 if args.tiny else args.seconds
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-load-") + "/ws")
    server = w.Serve(ws)
    try:
        client = server.client
        refs = ["raw/date=2025-01-%02d/n=1" % d for d in range(1, 9)]
        client.create_want(refs, want_id="seed")
        while client.get_want("seed")["status"] != "Successful":
            time.sleep(0.05)
        run_id = client.get_want("seed")["job_run_ids"][0]
        requests = [
            ("GET", "/health", None),
            ("GET", "/api/wants?limit=20", None),
            ("GET", "/api/wants/seed", None),
            ("GET", "/api/partitions?prefix=raw/&limit=5", None),
            ("GET", "/api/partitions/" + refs[0], None),
            ("GET", "/api/job_runs?limit=10", None),
            ("GET", "/api/job_runs/" + run_id, None),
            ("GET", "/api/job_runs/%s/logs/stdout?tail=100" % run_id, None),
            ("GET", "/api/events?since=0&limit=50", None),
            ("GET", "/metrics", None),
            ("POST", "/api/wants", json.dumps({"partitions": [refs[1]]})),
            ("POST", "/api/wants", json.dumps({"partitions": refs, "want_id": "seed"})),
            ("POST", "/api/partitions/%s/taint" % refs[2], json.dumps({"reason": "load"})),
        ]
        stop = threading.Event()
        samples, wanted, backlog = [], [0], []

        def sample():
            t0 = time.monotonic()
            while True:
                samples.append((time.monotonic() - t0, server.rss_mb()))
                backlog.append(wanted[0] - client.list_partitions(
                    prefix="daily/", status="Live", limit=0)["total"])
                if stop.wait(5.0):
                    return

        def write():  # new partitions all the time: a history that grows
            n, batch = 0, 10
            while not stop.wait(batch / args.new_per_second):
                refs = ["daily/date=2025-02-01/n=%d" % (n + i) for i in range(batch)]
                client.create_want(refs)
                n += batch
                wanted[0] = n
        threads = [threading.Thread(target=sample, daemon=True)]
        if args.new_per_second > 0:
            threads.append(threading.Thread(target=write, daemon=True))
        for thread in threads:
            thread.start()
        rps, errors = w.load(server.host, server.port, requests, seconds)
        stop.set()
        for thread in threads:
            thread.join()
        samples.append((seconds, server.rss_mb()))
        events = client.health()["latest_event_id"]
        built = client.list_partitions(status="Live", limit=0)["total"]
    finally:
        server.stop()
    answered = int(rps * seconds)
    start = 60.0 if seconds > 120 else seconds / 2
    tail = [(t, r) for t, r in samples if t >= start] or samples
    w.report("load", [], {"seconds": seconds, "requests": answered, "rps": rps,
                          "errors": errors, "events": events, "target": "errors == 0",
                          "partitions_wanted": wanted[0], "partitions_live": built,
                          "rss_first_mb": samples[0][1], "rss_last_mb": samples[-1][1],
                          "rss_slope_mb_per_min": _slope(tail) * 60,
                          "rss_mb_by_minute": [round(r, 1) for t, r in samples
                                               if t % 60 < 5 or t == seconds],
                          "backlog_max": max(backlog), "backlog_last": backlog[-1],
                          "machine": w.machine()})


def _slope(points):
    """Least-squares slope of (t, y) points (per second); 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


if __name__ == "__main__":
    main()
