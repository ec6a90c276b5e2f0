"""Row 6 of the performance issue: databuild against Luigi on the same DAG.

A two-stage DAG of N dates (1,000): out/date=D needs raw/date=D.  databuild
learns the dependency from a dep miss (the out job reports raw/date=D
missing); Luigi gets it from requires().  Both write the same files.  One want
for every out/date=D against one luigi.build() of every Out(D), in-process,
local scheduler, one worker.  databuild runs twice: one partition per job run,
and batched (max_partitions_per_run, the way to run many small partitions).

    pip install luigi        # a benchmark-only dependency
    python tests/benchmarks/bench_luigi.py [--tiny]
"""
import datetime
import logging
import os
import tempfile
import time

import _workload as w

RAW = r'''
mkdir -p data/raw
for ref in "$@"; do d=${ref#raw/date=}; echo "raw $d" > "data/raw/$d.txt"; done
'''
OUT = r'''
missing=""
for ref in "$@"; do
  d=${ref#out/date=}
  [ -e "data/raw/$d.txt" ] || missing="$missing${missing:+,}\"raw/date=$d\""
done
if [ -n "$missing" ]; then echo "DATABUILD_MISSING_DEPS_JSON: {\"missing_deps\": [$missing]}"; exit 0; fi
mkdir -p data/out
for ref in "$@"; do d=${ref#out/date=}; { cat "data/raw/$d.txt"; echo out; } > "data/out/$d.txt"; done
'''
TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "raw"
entrypoint = ["bash", "raw.sh"]
partition_patterns = ['raw/date=\\d{4}-\\d{2}-\\d{2}']
max_partitions_per_run = %(batch)d

[[jobs]]
label = "out"
entrypoint = ["bash", "out.sh"]
partition_patterns = ['out/date=\\d{4}-\\d{2}-\\d{2}']
max_partitions_per_run = %(batch)d
"""


def dates(n):
    start = datetime.date(2020, 1, 1)
    return [str(start + datetime.timedelta(i)) for i in range(n)]


def run_databuild(n, batch):
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-luigi-db-") + "/ws",
                          TOML % {"batch": batch})
    for name, text in (("raw.sh", RAW), ("out.sh", OUT)):
        with open(os.path.join(ws, name), "w") as f:
            f.write(text)
    server = w.Serve(ws)
    try:
        client = server.client
        t0 = time.perf_counter()
        want = client.create_want(["out/date=%s" % d for d in dates(n)])
        delay = 0.01
        while True:  # a light probe: no want is live any more
            if not w.live_wants(client):
                break
            time.sleep(delay)
            delay = min(0.05, delay * 1.5)
        elapsed = time.perf_counter() - t0
        status = client.get_want(want["want_id"])["status"]
        runs = client.list_job_runs(limit=0)["total"]
    finally:
        server.stop()
    assert status == "Successful", status
    assert len(os.listdir(os.path.join(ws, "data", "out"))) == n
    return elapsed, runs


def run_luigi(n):
    import luigi
    root = tempfile.mkdtemp(prefix="bench-luigi-lg-")

    class Raw(luigi.Task):
        date = luigi.Parameter()

        def output(self):
            return luigi.LocalTarget(os.path.join(root, "data", "raw", "%s.txt" % self.date))

        def run(self):
            with self.output().open("w") as f:
                f.write("raw %s\n" % self.date)

    class Out(luigi.Task):
        date = luigi.Parameter()

        def requires(self):
            return Raw(self.date)

        def output(self):
            return luigi.LocalTarget(os.path.join(root, "data", "out", "%s.txt" % self.date))

        def run(self):
            with self.input().open() as src, self.output().open("w") as f:
                f.write(src.read() + "out\n")

    logging.getLogger("luigi").setLevel(logging.WARNING)
    logging.getLogger("luigi-interface").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ok = luigi.build([Out(d) for d in dates(n)], local_scheduler=True, workers=1,
                     log_level="WARNING")
    elapsed = time.perf_counter() - t0
    assert ok and len(os.listdir(os.path.join(root, "data", "out"))) == n
    return elapsed


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 1000}),
                        ("--batch", {"type": int, "default": 100,
                                     "help": "max_partitions_per_run"}))
    n = 20 if args.tiny else args.n
    repeat = args.repeat
    try:
        import luigi  # noqa: F401
    except ImportError:
        raise SystemExit("bench_luigi needs Luigi: pip install luigi")
    rows = []
    for rep in range(repeat):
        lg = run_luigi(n)
        one, runs_one = run_databuild(n, 1)
        batched, runs_batched = run_databuild(n, args.batch)
        rows.append({"rep": rep, "luigi_s": lg, "databuild_s": one, "job_runs": runs_one,
                     "ratio": one / lg, "batched_s": batched, "batched_job_runs": runs_batched,
                     "batched_ratio": batched / lg})

    def median(key):
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]
    w.report("luigi", rows, {"n": n, "batch": args.batch, "median_ratio": median("ratio"),
                             "median_batched_ratio": median("batched_ratio"),
                             "target": "<= 0.1", "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
