"""A scriptable job for the tests: what it does per ref comes from plan.json.

``python testjob.py REF...`` runs in the workspace.  ``plan.json`` maps a ref
to ``{"deps": [...], "exit": N, "sleep": S, "sleep_times": N, "fail_times": N,
"stdout": "...", "ignore_term": true, "leave": {"argv": [...], "setsid": true},
"reads": [...]}``
(every key optional; ``leave`` starts a process that outlives the job, its pid
in ``runs/<ref>.left``; ``reads`` are printed as the read-deps line; an unplanned ref
just succeeds; ``sleep_times`` limits the sleep to the first N invocations; with ``ignore_term``
each SIGTERM it ignores adds a line to ``runs/terms``).  A ref is "built" when
``built/<ref>`` exists.  Each invocation appends a line to ``runs/<ref>``.
"""
import json
import os
import signal
import sys
import time
import urllib.parse


def fname(ref):
    return urllib.parse.quote(ref, safe="")


def main(refs):
    try:
        with open("plan.json") as f:
            plan = json.load(f)
    except FileNotFoundError:
        plan = {}
    os.makedirs("runs", exist_ok=True)
    os.makedirs("built", exist_ok=True)
    attempts = {}
    for ref in refs:
        with open(os.path.join("runs", fname(ref)), "a") as f:
            f.write("%s %s\n" % (os.getpid(), os.environ.get("DATABUILD_JOB_RUN_ID")))
        with open(os.path.join("runs", fname(ref))) as f:
            attempts[ref] = len(f.readlines())
    missing = []
    for ref in refs:
        for dep in plan.get(ref, {}).get("deps", []):
            if not os.path.exists(os.path.join("built", fname(dep))) and dep not in missing:
                missing.append(dep)
    for ref in refs:
        step = plan.get(ref, {})
        if step.get("stdout"):
            print(step["stdout"], flush=True)
    if missing:
        print("DATABUILD_MISSING_DEPS_JSON: " + json.dumps({"missing_deps": missing}), flush=True)
        return 0
    for ref in refs:
        leave = plan.get(ref, {}).get("leave")
        if leave:
            import subprocess
            child = subprocess.Popen(leave["argv"], start_new_session=leave.get("setsid", False),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            with open(os.path.join("runs", fname(ref) + ".left"), "w") as f:
                f.write("%d\n" % child.pid)
    if any(plan.get(ref, {}).get("ignore_term") for ref in refs):
        def ignored(signum, frame):  # ignored, but said (runs/terms), for tests to wait on
            with open(os.path.join("runs", "terms"), "a") as f:
                f.write("%d\n" % os.getpid())
        signal.signal(signal.SIGTERM, ignored)
    with open(os.path.join("runs", "pids"), "a") as f:
        f.write("%d\n" % os.getpid())
    time.sleep(max((plan.get(ref, {}).get("sleep", 0) for ref in refs
                    if attempts[ref] <= plan.get(ref, {}).get("sleep_times", 1 << 30)), default=0))
    for ref in refs:
        step = plan.get(ref, {})
        if attempts[ref] <= step.get("fail_times", 0):
            print("planned failure %d of %s" % (attempts[ref], ref), file=sys.stderr)
            return 1
        if step.get("exit"):
            print("planned exit %d for %s" % (step["exit"], ref), file=sys.stderr)
            return step["exit"]
    # Taken with no file of ours open: the listing's own descriptor is the 4th.
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    stdin = sys.stdin.read()
    for ref in refs:
        record = {"ref": ref, "env": {k: v for k, v in os.environ.items()
                                      if k.startswith(("DATABUILD_", "TEST_"))},
                  "argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": stdin, "fds": fds}
        with open(os.path.join("built", fname(ref)), "w") as f:
            f.write(json.dumps(record))
    reads = [r for ref in refs for r in plan.get(ref, {}).get("reads", [])]
    if reads:
        print("DATABUILD_READ_DEPS_JSON: " + json.dumps({"read_deps": reads}), flush=True)
    print("built", " ".join(refs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
