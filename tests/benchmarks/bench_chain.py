"""Row 5 of the performance issue: how fast a finished job unblocks the next.

A chain of N partitions (100) where chain/i's job reports chain/i-1 missing.
For each link: the time from the upstream job process's exit (recorded by the
job itself as its last act, bash's $EPOCHREALTIME) to the start of the run it
unblocks (the job_run_start event, stamped when the process was spawned).

    python tests/benchmarks/bench_chain.py [--tiny]
"""
import os
import statistics
import tempfile
import time

import _workload as w
import databuild

JOB = r'''
i=${1#chain/}
if [ "$i" -gt 0 ] && [ ! -e "built/$((i-1))" ]; then
  echo "DATABUILD_MISSING_DEPS_JSON: {\"missing_deps\": [\"chain/$((i-1))\"]}"
  exit 0
fi
: > "built/$i"
echo "$i $EPOCHREALTIME" >> exits
'''

TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "chain"
entrypoint = ["bash", "job.sh"]
partition_patterns = ['chain/\\d+']
"""


def run_once(n):
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-chain-") + "/ws", TOML)
    with open(os.path.join(ws, "job.sh"), "w") as f:
        f.write(JOB)
    os.makedirs(os.path.join(ws, "built"))
    server = w.Serve(ws)
    try:
        client = server.client
        want = client.create_want(["chain/%d" % n])
        while client.get_want(want["want_id"])["status"] not in databuild.TERMINAL_WANT_STATUSES:
            time.sleep(0.05)
        events, since = [], 0
        while True:
            page = client.events(since=since, limit=1000)["data"]
            if not page:
                break
            events += page
            since = page[-1]["event_id"]
    finally:
        server.stop()
    exits = {}
    with open(os.path.join(ws, "exits")) as f:
        for line in f:
            i, t = line.split()
            exits[int(i)] = float(t)
    runs = {e["payload"]["job_run_id"]: e["payload"]["partitions"][0]
            for e in events if e["type"] == "job_run_queue"}
    starts = {}  # ref -> start time of its last run (the one after its dep was built)
    for e in events:
        if e["type"] == "job_run_start":
            starts[runs[e["payload"]["job_run_id"]]] = _epoch(e["timestamp"])
    latencies = [(starts["chain/%d" % i] - exits[i - 1]) * 1000 for i in range(1, n + 1)]
    return latencies


def _epoch(stamp):
    import datetime
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 100}))
    n = 10 if args.tiny else args.n
    repeat = args.repeat
    rows = []
    for rep in range(repeat):
        lat = run_once(n)
        rows.append({"rep": rep, "median_ms": statistics.median(lat),
                     "p90_ms": sorted(lat)[int(len(lat) * 0.9) - 1], "max_ms": max(lat)})
    medians = sorted(r["median_ms"] for r in rows)
    w.report("chain", rows, {"n": n, "median_ms": medians[len(medians) // 2],
                             "target": "<= 5 ms", "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
