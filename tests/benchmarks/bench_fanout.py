"""Row 4 of the performance issue: orchestrator overhead on a wide want.

One want for N partitions (2,000) of a trivial `sh` job, one partition per
run, max_concurrent_job_runs = 4: time from POST to Successful, against a
4-thread pool spawning and waiting the same N `sh` processes.

Also printed, as a floor: one thread doing only the system work a run needs
under README "Job protocol" -- its log directory, posix_spawn with the two log files, a pidfd
to wait on, four at a time -- with no event, commit or HTTP.  An orchestrator
that spawns from its one thread, as databuild's does, cannot beat it;
``floor/pool`` says how much of the target that alone already takes.

    python tests/benchmarks/bench_fanout.py [--tiny]
"""
import concurrent.futures
import os
import select
import subprocess
import tempfile
import time

import _workload as w

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


def floor_time(n, logs_dir):
    """N runs of the job, four at a time, by one thread doing only what README "Job protocol"
    asks of the system per run (log directory, spawn with log files, wait)."""
    program = subprocess.check_output(["sh", "-c", "command -v sh"], text=True).strip()
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    poller = select.poll()
    running = {}
    started = done = 0
    t0 = time.perf_counter()
    while done < n:
        while len(running) < 4 and started < n:
            log_dir = os.path.join(logs_dir, str(started))
            os.mkdir(log_dir)
            pid = os.posix_spawn(program, ["sh", "-c", "exit 0", "p/0/%d" % started], env,
                                 file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, log_dir + "/stdout.log", flags, 0o644),
                                     (os.POSIX_SPAWN_OPEN, 2, log_dir + "/stderr.log", flags, 0o644)],
                                 setsid=True)
            fd = os.pidfd_open(pid)
            poller.register(fd, select.POLLIN)
            running[fd] = pid
            started += 1
        for fd, _ in poller.poll():
            poller.unregister(fd)
            os.close(fd)
            os.waitpid(running.pop(fd), 0)
            done += 1
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
    tmp = tempfile.mkdtemp(prefix="bench-fanout-")
    ws = w.make_workspace(tmp + "/ws", TOML)
    server = w.Serve(ws)
    rows = []
    try:
        client = server.client
        for rep in range(repeat):
            base = pool_time(n)
            floor_dir = os.path.join(tmp, "floor-%d" % rep)
            os.mkdir(floor_dir)
            floor = floor_time(n, floor_dir)
            ours = databuild_time(server, client, rep, n)
            rows.append({"rep": rep, "pool_s": base, "floor_s": floor, "databuild_s": ours,
                         "floor/pool": floor / base, "ratio": ours / base})
    finally:
        server.stop()
    ratios = sorted(r["ratio"] for r in rows)
    floors = sorted(r["floor/pool"] for r in rows)
    w.report("fanout", rows, {"n": n, "median_ratio": ratios[len(ratios) // 2],
                              "median_floor/pool": floors[len(floors) // 2],
                              "target": "<= 1.25", "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
