"""Python jobs on the python executor (warm interpreters), written as plain
scripts (module-level code, no ``__main__`` guard).

1. The two-stage DAG of bench_luigi (out/date=D needs raw/date=D) with both
   jobs written in Python, one partition per run, N dates (300): learnt from
   a dep miss on the python executor and the local one, and declared
   (``deps = ["raw/date={date}"]``: exactly 2N job runs) on the python
   executor, against in-process Luigi tasks (local scheduler, one worker).
   Targets: dep miss / luigi <= 1.0, declared / luigi <= 0.6.
2. A job whose imports take 300 ms (a module that sleeps at import stands in
   for pandas): M one-partition runs (200), python executor against local.
   Target: <= 0.1.
3. Per-run overhead: the M runs of a trivial Python job on the python
   executor against a bare loop that imports the job once and forks a child
   per run, four at a time, doing the same work.  Target: <= 2.

    pip install luigi        # a benchmark-only dependency
    python tests/benchmarks/bench_python.py [--tiny] [-n DATES] [-m RUNS]
"""
import os
import sys
import tempfile
import time

import _workload as w
from bench_luigi import dates, run_luigi as luigi_dag  # the same DAG in Luigi

DAG_JOB = r'''
import os, sys
import json  # what a job imports; imported ahead by the warm interpreter

stage, refs = sys.argv[1], sys.argv[2:]
missing = []
for ref in refs:
    d = ref.split("=", 1)[1]
    if stage == "raw":
        os.makedirs("data/raw", exist_ok=True)
        with open("data/raw/%s.txt" % d, "w") as f:
            f.write("raw %s\n" % d)
    elif not os.path.exists("data/raw/%s.txt" % d):
        missing.append("raw/date=" + d)
    else:
        os.makedirs("data/out", exist_ok=True)
        with open("data/raw/%s.txt" % d) as src, open("data/out/%s.txt" % d, "w") as f:
            f.write(src.read() + "out\n")
if missing:
    print("DATABUILD_MISSING_DEPS_JSON: " + json.dumps({"missing_deps": missing}))
'''
DAG_TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "raw"
entrypoint = [%(python)r, "dag.py", "raw"]
partition_patterns = ['raw/date=(?P<date>\\d{4}-\\d{2}-\\d{2})']
executor = %(executor)r

[[jobs]]
label = "out"
entrypoint = [%(python)r, "dag.py", "out"]
partition_patterns = ['out/date=(?P<date>\\d{4}-\\d{2}-\\d{2})']
executor = %(executor)r
%(deps)s
"""
HEAVY = "import time\ntime.sleep(%(seconds)s)  # stands in for pandas, pyarrow ...\n"
JOB = r'''
import os, sys
import heavy

os.makedirs("built", exist_ok=True)
for ref in sys.argv[1:]:
    with open(os.path.join("built", ref.replace("/", "_")), "w") as f:
        f.write(ref)
'''
JOB_TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "job"
entrypoint = [%(python)r, "job.py"]
partition_patterns = ['p/\\d+/\\d+']
executor = %(executor)r
"""


def workspace(prefix, toml, files):
    ws = w.make_workspace(tempfile.mkdtemp(prefix=prefix) + "/ws", toml)
    for name, text in files.items():
        with open(os.path.join(ws, name), "w") as f:
            f.write(text)
    return ws


def build(ws, refs):
    """Seconds from the want's POST to its end, and how many job runs it took."""
    server = w.Serve(ws)
    try:
        t0 = time.perf_counter()
        want = server.client.create_want(refs)
        delay = 0.005
        while w.live_wants(server.client):
            time.sleep(delay)
            delay = min(0.05, delay * 1.5)
        elapsed = time.perf_counter() - t0
        status = server.client.get_want(want["want_id"])["status"]
        runs = server.client.list_job_runs(limit=0)["total"]
    finally:
        server.stop()
    assert status == "Successful", status
    return elapsed, runs


def dag(n, executor, declared=False):
    ws = workspace("bench-python-dag-", DAG_TOML % {
        "python": sys.executable, "executor": executor,
        "deps": 'deps = ["raw/date={date}"]' if declared else ""}, {"dag.py": DAG_JOB})
    elapsed, runs = build(ws, ["out/date=[%s..%s]" % (dates(n)[0], dates(n)[-1])])
    assert len(os.listdir(os.path.join(ws, "data", "out"))) == n
    if declared:
        assert runs == 2 * n, runs  # each partition once
    return elapsed, runs


def runs(m, executor, import_seconds, rep):
    ws = workspace("bench-python-job-", JOB_TOML % {"python": sys.executable,
                                                   "executor": executor},
                   {"job.py": JOB, "heavy.py": HEAVY % {"seconds": import_seconds}})
    return build(ws, ["p/%d/%d" % (rep, i) for i in range(m)])[0]


def fork_loop(m):
    """The floor: the job's imports done once, the script compiled once, a
    fork per run that runs it, four at a time."""
    ws = workspace("bench-python-fork-", "", {"job.py": JOB, "heavy.py": HEAVY % {"seconds": 0}})
    cwd = os.getcwd()
    os.chdir(ws)
    sys.path.insert(0, ws)
    try:
        import heavy  # noqa: F401  (the imports, once)
        with open("job.py") as f:
            code = compile(f.read(), "job.py", "exec")
        t0 = time.perf_counter()
        running, started = set(), 0
        while started < m or running:
            while len(running) < 4 and started < m:
                pid = os.fork()
                if pid == 0:
                    try:
                        sys.argv = ["job.py", "p/0/%d" % started]
                        exec(code, {"__name__": "__main__"})
                    finally:
                        os._exit(0)
                running.add(pid)
                started += 1
            pid, _ = os.wait()
            running.discard(pid)
        return time.perf_counter() - t0
    finally:
        os.chdir(cwd)
        sys.path.remove(ws)


def main():
    args = w.parse_args(__doc__, ("-n", {"type": int, "default": 300, "help": "dates"}),
                        ("-m", {"type": int, "default": 200, "help": "runs"}))
    n, m = (20, 10) if args.tiny else (args.n, args.m)
    try:
        import luigi  # noqa: F401
    except ImportError:
        raise SystemExit("bench_python needs Luigi: pip install luigi")
    rows = []
    for rep in range(args.repeat):
        lg = luigi_dag(n)
        warm, _ = dag(n, "python")
        cold, _ = dag(n, "local")
        declared, declared_runs = dag(n, "python", declared=True)
        heavy_warm = runs(m, "python", 0.3, rep)
        heavy_cold = runs(m, "local", 0.3, rep)
        trivial = runs(m, "python", 0, rep)
        floor = fork_loop(m)
        rows.append({"rep": rep, "luigi_s": lg, "dag_python_s": warm, "dag_local_s": cold,
                     "dag_ratio": warm / lg, "dag_local_ratio": cold / lg,
                     "declared_s": declared, "declared_runs": declared_runs,
                     "declared_ratio": declared / lg,
                     "import300_python_s": heavy_warm, "import300_local_s": heavy_cold,
                     "import_ratio": heavy_warm / heavy_cold, "python_s": trivial,
                     "fork_loop_s": floor, "overhead_ratio": trivial / floor})

    def median(key):
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]
    w.report("python", rows, {
        "dates": n, "runs": m, "median_dag_ratio": median("dag_ratio"),
        "median_declared_ratio": median("declared_ratio"),
        "median_import_ratio": median("import_ratio"),
        "median_overhead_ratio": median("overhead_ratio"),
        "targets": {"dag_ratio": "<= 1.0", "declared_ratio": "<= 0.6", "import_ratio": "<= 0.1",
                    "overhead_ratio": "<= 2"},
        "rows": rows, "machine": w.machine()})


if __name__ == "__main__":
    main()
