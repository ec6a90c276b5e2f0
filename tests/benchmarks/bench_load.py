"""A mixed load: 16 keep-alive clients sending reads of every kind, writes
(new wants, repeated want ids, taints) and bad requests, for a while.

Prints the requests answered, the answers that were not the expected ones
(the figure that must be 0: no 5xx, no unexpected 4xx) and requests/s.  Not
a target of the performance table: a soak for errors under load.

    python tests/benchmarks/bench_load.py [--tiny] [--seconds S]
"""
import json
import tempfile
import time

import _workload as w


def main():
    args = w.parse_args(__doc__, ("--seconds", {"type": float, "default": 20.0}))
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
        rps, errors = w.load(server.host, server.port, requests, seconds)
        events = client.health()["latest_event_id"]
    finally:
        server.stop()
    answered = int(rps * seconds)
    w.report("load", [], {"seconds": seconds, "requests": answered, "rps": rps,
                          "errors": errors, "events": events, "target": "errors == 0",
                          "machine": w.machine()})


if __name__ == "__main__":
    main()
