"""Row 4 of the performance issue: orchestrator overhead on a wide want.

One want for N partitions (2,000) of a trivial `sh` job, one partition per
run, max_concurrent_job_runs = 4: time from POST to Successful, against a
4-thread pool spawning and waiting the same N `sh` processes.

    python tests/benchmarks/bench_fanout.py [--tiny]
"""
import concurrent.futures
import subprocess
import tempfile
import time

import _workload as w
import databuild

TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "trivial"
entrypoint = ["sh", "-c", "exit 0"]
partition_patterns = ['p/\\d+/\\d+']
"""


def pool_time(n):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: subprocess.run(["sh", "-c", "exit 0", "p/0/%d" % i]), range(n)))
    return time.perf_counter() - t0


def databuild_time(server, client, rep, n):
    refs = ["p/%d/%d" % (rep, i) for i in range(n)]
    t0 = time.perf_counter()
    client.create_want(refs)
    # Poll counts, not the 2,000-partition want itself: the probe must not be
    # what is measured.
    delay = 0.01
    while w.live_wants(client):
        time.sleep(delay)
        delay = min(0.05, delay * 1.5)
    return time.perf_counter() - t0


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 2000}))
    n = 50 if args.tiny else args.n
    repeat = args.repeat
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-fanout-") + "/ws", TOML)
    server = w.Serve(ws)
    rows = []
    try:
        client = databuild.Client(server.url)
        for rep in range(repeat):
            base = pool_time(n)
            ours = databuild_time(server, client, rep, n)
            rows.append({"rep": rep, "pool_s": base, "databuild_s": ours, "ratio": ours / base})
    finally:
        server.stop()
    ratios = sorted(r["ratio"] for r in rows)
    w.report("fanout", rows, {"n": n, "median_ratio": ratios[len(ratios) // 2],
                              "target": "<= 1.25", "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
