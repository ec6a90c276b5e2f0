"""A range backfill: one want for N partitions (10,000) written as one range.

``POST /api/wants`` with ``p/[00000..09999]`` (README "Backfills") of a
trivial ``sh`` job, one partition per run, max_concurrent_job_runs = 4:

* how long the want's creation takes to answer (target: under a second);
* sustained job runs per second, from the answer to the want's end, against
  a 4-thread pool spawning and waiting the same N ``sh`` processes;
* the server's CPU time per run (user + system of the server process, from
  /proc, over the same span).

    python tests/benchmarks/bench_backfill.py [--tiny] [-n PARTITIONS]
"""
import os
import tempfile
import time

import _workload as w
from bench_fanout import TOML, pool_time  # the same trivial job, 4 at a time


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backfill(server, rep, n):
    ref = "p/%d/[%s..%s]" % (rep, "0" * len(str(n - 1)), n - 1)
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    want = server.client.create_want([ref])
    created = time.perf_counter() - t0
    assert want["counts"]["total"] == n, want["counts"]
    delay = 0.01
    while w.live_wants(server.client):
        time.sleep(delay)
        delay = min(0.05, delay * 1.5)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0
    final = server.client.get_want(want["want_id"])
    assert final["status"] == "Successful", final["status"]
    return created, elapsed, cpu


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 10000}))
    n = 100 if args.tiny else args.n
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-backfill-") + "/ws", TOML)
    server = w.Serve(ws)
    rows = []
    try:
        for rep in range(args.repeat):
            pool = pool_time(n)
            created, elapsed, cpu = backfill(server, rep, n)
            rows.append({"rep": rep, "create_s": created, "databuild_s": elapsed,
                         "pool_s": pool, "runs_per_s": n / elapsed, "pool_runs_per_s": n / pool,
                         "ratio": elapsed / pool, "server_cpu_ms_per_run": cpu * 1000 / n})
    finally:
        server.stop()

    def median(key):
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]
    w.report("backfill", rows, {
        "n": n, "median_create_s": median("create_s"), "median_ratio": median("ratio"),
        "median_runs_per_s": median("runs_per_s"),
        "median_server_cpu_ms_per_run": median("server_cpu_ms_per_run"),
        "targets": {"create_s": "< 1"}, "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
