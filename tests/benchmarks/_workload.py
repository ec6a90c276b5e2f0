"""Shared pieces of the benchmarks (not collected by pytest): realistic event
logs built through the storage layer, a keep-alive HTTP load generator, a
`serve` subprocess, and table/JSON reporting."""
import http.client
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import databuild  # noqa: E402

MODULE = os.path.join(ROOT, "databuild.py")

WORKSPACE_TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "raw"
entrypoint = ["sh", "-c", "exit 0"]
partition_patterns = ['raw/date=\\d{4}-\\d{2}-\\d{2}/n=\\d+']

[[jobs]]
label = "daily"
entrypoint = ["sh", "-c", "exit 0"]
partition_patterns = ['daily/date=\\d{4}-\\d{2}-\\d{2}/n=\\d+']
"""


def make_workspace(path, toml=WORKSPACE_TOML):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "databuild.toml"), "w") as f:
        f.write(toml)
    return path


def build_log(workspace, n_events, seed=1):
    """Fill ``<workspace>/.databuild/events.db`` (events and projection, as the
    orchestrator writes them) with about ``n_events`` events of a
    realistic mix: manual wants whose job reports a missing upstream, derivative
    wants, upstream builds, reruns, some plain failures with a retry, and some
    wants for partitions that already exist.  Returns the manual want ids."""
    rng = random.Random(seed)
    log = databuild.EventLog(os.path.join(workspace, ".databuild", "events.db"))
    # The orchestrator's kind of state (to write the projection too): memory
    # bounded by the work in progress, resting partitions read back from the log.
    state = databuild.BuildState(working_set=True, store=log)
    ts = 1.7e9
    batch, want_ids, written, i = [], [], 0, 0

    def flush():
        nonlocal written
        first = state.latest_event_id + 1
        for k, (type_, payload, stamp) in enumerate(batch):
            state.apply(databuild.Event(first + k, stamp, type_, payload))
        changes = state.take_changes()
        log.append(batch, changes=changes, summary=state.summary())
        state.forget(changes)
        written += len(batch)
        batch.clear()

    def add(type_, payload):
        nonlocal ts
        ts += 0.001
        batch.append((type_, payload, ts))

    def rid():
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    live = []
    while written + len(batch) < n_events:
        i += 1
        day = "2025-%02d-%02d" % (1 + i % 12, 1 + i % 28)
        daily, raw = "daily/date=%s/n=%d" % (day, i), "raw/date=%s/n=%d" % (day, i)
        if live and rng.random() < 0.1:  # a want for something already built
            w = rid()
            add("want_create", {"want_id": w, "partitions": [rng.choice(live)],
                                "data_timestamp": ts, "ttl_seconds": None, "sla_seconds": None,
                                "source": {"type": "manual", "user": "bench"},
                                "parent_want_id": None, "root_want_id": w, "comment": None})
            want_ids.append(w)
            continue
        w = rid()
        add("want_create", {"want_id": w, "partitions": [daily], "data_timestamp": ts,
                            "ttl_seconds": 86400, "sla_seconds": None,
                            "source": {"type": "manual", "user": "bench"},
                            "parent_want_id": None, "root_want_id": w, "comment": "bench"})
        want_ids.append(w)
        r1 = rid()
        add("job_run_queue", {"job_run_id": r1, "job_label": "daily", "partitions": [daily],
                              "want_ids": [w], "attempt": 1})
        add("job_run_start", {"job_run_id": r1, "pid": 1000 + i, "pid_start_time": i})
        add("job_run_missing_deps", {"job_run_id": r1, "missing_deps": [raw], "exit_code": 0})
        d = rid()
        add("want_create", {"want_id": d, "partitions": [raw], "data_timestamp": ts,
                            "ttl_seconds": 86400, "sla_seconds": None,
                            "source": {"type": "job", "job_run_id": r1},
                            "parent_want_id": w, "root_want_id": w, "comment": None})
        r2 = rid()
        add("job_run_queue", {"job_run_id": r2, "job_label": "raw", "partitions": [raw],
                              "want_ids": [d], "attempt": 1})
        add("job_run_start", {"job_run_id": r2, "pid": 2000 + i, "pid_start_time": i})
        if rng.random() < 0.1:  # a plain failure, then a retry
            add("job_run_failure", {"job_run_id": r2, "exit_code": 1, "error": "exit code 1: flaky",
                                    "retry": True, "counted": True})
            r2 = rid()
            add("job_run_queue", {"job_run_id": r2, "job_label": "raw", "partitions": [raw],
                                  "want_ids": [d], "attempt": 2})
            add("job_run_start", {"job_run_id": r2, "pid": 3000 + i, "pid_start_time": i})
        add("job_run_success", {"job_run_id": r2, "exit_code": 0})
        r3 = rid()
        add("job_run_queue", {"job_run_id": r3, "job_label": "daily", "partitions": [daily],
                              "want_ids": [w], "attempt": 1})
        add("job_run_start", {"job_run_id": r3, "pid": 4000 + i, "pid_start_time": i})
        add("job_run_success", {"job_run_id": r3, "exit_code": 0})
        live.append(daily)
        if len(batch) >= 20000:
            flush()
    if batch:
        flush()
    log.close()
    return want_ids


#: (host, port) -> the access token of a server started by Serve.
TOKENS = {}


class Serve:
    """``databuild.py serve`` as a subprocess; ``started`` seconds until it listened."""

    def __init__(self, workspace, *extra):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, MODULE, "serve", "--workspace", workspace,
                                      "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("Listening on "):
            raise SystemExit("serve did not start: %r" % line)
        self.url = line.split()[-1]
        self.host, port = self.url.split("//")[1].split(":")
        self.port = int(port)
        self.started = time.perf_counter() - t0
        info = databuild.read_server_info(os.path.join(workspace, ".databuild")) or {}
        self.token = info.get("token")
        TOKENS[(self.host, self.port)] = self.token  # for load()
        self.client = databuild.Client(self.url, token=self.token)

    def rss_mb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _load_worker(args):
    host, port, requests, seconds, threads, token = args
    counts = [0] * threads
    errors = [0] * threads
    deadline = time.perf_counter() + seconds

    def run(k):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        n = 0
        while time.perf_counter() < deadline:
            method, path, body = requests[(k + n * threads) % len(requests)]
            headers = {"Content-Type": "application/json"} if body is not None else {}
            if token:
                headers["Authorization"] = "Bearer " + token
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status >= 400:
                    errors[k] += 1
                else:
                    counts[k] += 1
            except (OSError, http.client.HTTPException):
                errors[k] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            n += 1
        conn.close()
    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts), sum(errors), time.perf_counter() - t0


def load(host, port, requests, seconds=3.0, clients=16, processes=2):
    """Keep-alive HTTP load with ``clients`` concurrent connections spread over
    ``processes`` client processes; returns (requests per second, errors)."""
    per = clients // processes
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(_load_worker, [(host, port, requests, seconds, per,
                                           TOKENS.get((host, port)))] * processes)
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    return done / elapsed, errors


def parse_args(doc, *options):
    """The command line every benchmark shares: ``--tiny`` (seconds, for CI; one
    repetition) and ``--repeat``, plus ``options`` as (flag, add_argument kwargs)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny size, for CI")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median)")
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if args.tiny:
        args.repeat = 1
    return args


def live_wants(client):
    """How many wants are not finished yet (three cheap count queries)."""
    return sum(client.list_wants(status=s, limit=0)["total"]
               for s in databuild.LIVE_WANT_STATUSES)


def median_of(fn, repeat):
    values = [fn() for _ in range(repeat)]
    return statistics.median(values), values


def report(name, rows, summary):
    """Print a table of ``rows`` (dicts) and one JSON line ``{"benchmark", ...summary}``."""
    if rows:
        keys = list(rows[0])
        cells = [keys] + [[("%.3g" % v) if isinstance(v, float) else str(v) for v in
                           (r[k] for k in keys)] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
    print(json.dumps({"benchmark": name, **summary}, sort_keys=True))


def machine():
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
