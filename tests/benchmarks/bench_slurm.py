"""job runs through Slurm, against Slurm's own floor.

N one-partition runs (500) of a trivial job through the slurm executor on a
one-node cluster: time from POST of one want to Successful, and the server's
CPU seconds per run (utime + stime of the serve process), and the most runs
seen Running at once (the executor's limit is 200).  Beside it, the same
N jobs through ``srun`` called from a 4-thread pool: what the cluster itself
takes to run them when a client waits for each.  Target: ratio <= 1.5.

Starts its own cluster (tests/slurmcluster.py) unless SLURM_CONF is set;
where Slurm cannot be had it says why and measures nothing.

    python tests/benchmarks/bench_slurm.py [--tiny] [-n N]
"""
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

import _workload as w

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import slurmcluster  # noqa: E402

TOML = """
[server]
idle_timeout_seconds = 0

[executors.slurm]
max_concurrent_job_runs = 200

[[jobs]]
label = "trivial"
entrypoint = ["sh", "-c", "exit 0"]
partition_patterns = ['p/\\d+/\\d+']
executor = "slurm"
"""


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def srun_pool_time(n, env):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: subprocess.run(
            ["srun", "-J", "floor-%d" % i, "sh", "-c", "exit 0", "p/0/%d" % i], env=env,
            check=True, capture_output=True), range(n)))
    return time.perf_counter() - t0


def databuild_time(server, rep, n):
    refs = ["p/%d/%d" % (rep, i) for i in range(n)]
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    server.client.create_want(refs)
    delay, peak = 0.01, 0
    while w.live_wants(server.client):
        time.sleep(delay)
        delay = min(0.1, delay * 1.5)
        peak = max(peak, server.client.list_job_runs(status="Running", limit=1)["total"])
    return time.perf_counter() - t0, cpu_seconds(server.proc.pid) - cpu0, peak


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 500}))
    n = 20 if args.tiny else args.n
    tmp = tempfile.mkdtemp(prefix="bench-slurm-")
    cluster = None
    if not os.environ.get("SLURM_CONF"):
        reason = slurmcluster.unavailable()
        if reason:
            print("bench_slurm: nothing measured: %s" % reason)
            return
        cluster = slurmcluster.start(os.path.join(tmp, "cluster"))
        os.environ["SLURM_CONF"] = cluster.conf
    env = dict(os.environ)
    rows = []
    try:
        ws = w.make_workspace(tmp + "/ws", TOML)
        server = w.Serve(ws)
        try:
            for rep in range(args.repeat):
                floor = srun_pool_time(n, env)
                ours, cpu, peak = databuild_time(server, rep, n)
                rows.append({"rep": rep, "srun_pool_s": floor, "databuild_s": ours,
                             "server_cpu_ms_per_run": 1000 * cpu / n,
                             "peak_running": peak, "ratio": ours / floor})
        finally:
            server.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    ratios = sorted(r["ratio"] for r in rows)
    w.report("slurm", rows, {"n": n, "median_ratio": ratios[len(ratios) // 2],
                             "target": "<= 1.5", "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
