"""Executors (README "Running on a cluster"): the config of executors, per-executor limits, and the
Slurm executor against a real one-node cluster (``slurm_cluster``: skipped,
saying why, where Slurm cannot be installed; CI always has it)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import databuild
from conftest import run_count, wait_for, write_workspace

# -- config ---------------------------------------------------------------------


def _config(tmp_path, text):
    (tmp_path / "databuild.toml").write_text(text)
    return databuild.load_config(str(tmp_path))


JOB = '[[jobs]]\nlabel = "t"\nentrypoint = ["true"]\npartition_patterns = ["x"]\n'


@pytest.mark.parametrize("text, message", [
    (JOB + 'executor = "k8s"\n', "executor: must be one of 'local', 'python', 'slurm', not 'k8s'"),
    (JOB + 'sbatch_options = ["--mem=1G"]\n', "sbatch_options: only for jobs with executor = 'slurm'"),
    (JOB + 'executor = "slurm"\nsbatch_options = "--mem=1G"\n',
     "sbatch_options: must be a list of strings"),
    ('[executors.k8s]\n' + JOB, "[executors.k8s]: unknown executor"),
    ('[executors.slurm]\nmax_concurrent_job_runs = 0\n' + JOB,
     "[executors.slurm] max_concurrent_job_runs: must be at least 1"),
    ('[executors.local]\nsbatch_options = []\n' + JOB,
     "[executors.local] sbatch_options: unknown key (known: max_concurrent_job_runs)"),
    ('executors = 3\n' + JOB, "executors: must be a table of tables"),
    (JOB + 'executor = "python"\n', "entrypoint: a python job's entrypoint is [interpreter, "
     "script, ...]"),
    ('[executors.python]\nidle_seconds = -1\n' + JOB,
     "[executors.python] idle_seconds: must be at least 0"),
])
def test_executor_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(databuild.ConfigError) as e:
        _config(tmp_path, text)
    assert message in e.value.message


def test_executor_limits_and_job_options(tmp_path):
    config = _config(tmp_path, '[server]\nmax_concurrent_job_runs = 3\n[executors.slurm]\n'
                     'sbatch_options = ["-p", "debug"]\n' + JOB +
                     'executor = "slurm"\nsbatch_options = ["--mem=1G"]\n')
    (job,) = config.jobs
    assert job.executor == "slurm" and job.options == {"sbatch_options": ["--mem=1G"]}
    wake = databuild._Wakeup()
    limits = {name: cls(config, None, wake).limit for name, cls in databuild.executors.items()}
    assert limits == {"local": 3, "python": 3, "slurm": 200}  # the server's, and Slurm's own
    config.executor_settings["local"] = {"max_concurrent_job_runs": 7}
    assert databuild.LocalExecutor(config, None, wake).limit == 7


def test_each_executor_has_its_own_limit_and_jobs_their_caps(tmp_path, driver_for):
    # Runs of two executors fill their own limits, not each other's; a job's
    # max_concurrent_runs caps it inside its executor.  (Two "local"-like
    # executors: a subclass registered for the test, as a user would add one.)
    class Other(databuild.LocalExecutor):
        name = "other"
    databuild.executors["other"] = Other
    try:
        ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 2}, jobs=[
            {"label": "a", "partition_patterns": ["a/.*"]},
            {"label": "b", "partition_patterns": ["b/.*"], "executor": "other"},
            {"label": "c", "partition_patterns": ["c/.*"], "executor": "other",
             "max_concurrent_runs": 1}],
            plan={**{"a/%d" % i: {"sleep": 30} for i in range(4)},
                  **{"b/%d" % i: {"sleep": 30} for i in range(4)},
                  **{"c/%d" % i: {"sleep": 30} for i in range(3)}})
        with open(os.path.join(ws, "databuild.toml"), "a") as f:
            f.write("\n[executors.other]\nmax_concurrent_job_runs = 5\n")
        d = driver_for(ws)
        d.want(*["a/%d" % i for i in range(4)] + ["b/%d" % i for i in range(4)]
               + ["c/%d" % i for i in range(3)])
        d.until(lambda s: len(s.job_runs_by_status[databuild.RUNNING]) == 7)
        for _ in range(3):
            d.orch.step()
        running = [d.state.job_runs[r] for r in d.state.job_runs_by_status[databuild.RUNNING]]
        by_job = {label: sum(r.job_label == label for r in running) for label in "abc"}
        assert by_job == {"a": 2, "b": 4, "c": 1}
        assert {r.executor for r in running if r.job_label != "a"} == {"other"}
    finally:
        del databuild.executors["other"]


# -- Slurm ---------------------------------------------------------------------

def slurm_workspace(path, plan=None, **job):
    return write_workspace(path, jobs=[dict({"label": "t", "partition_patterns": [".+"],
                                             "executor": "slurm"}, **job)], plan=plan)


def squeue_state(cluster, slurm_id):
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", slurm_id, "-o", "%T"],
                         env=cluster.env, capture_output=True, text=True).stdout.strip()
    return out or None


def run_of(server, ref, status=None):
    runs = server.client.list_job_runs(status=status)["data"] if status else \
        server.client.list_job_runs()["data"]
    return [r for r in runs if ref in r["partitions"]]


def test_slurm_builds_a_chain_with_a_dep_miss_and_logs(tmp_path, slurm_cluster, serve):
    ws = slurm_workspace(tmp_path / "ws", plan={"c": {"deps": ["b"], "stdout": "hello from c"},
                                                "b": {"sleep": 1.5, "stdout": "line of b"}},
                         sbatch_options=["--job-name=ignored-by-databuild"])
    server = serve(ws, env=slurm_cluster.env)
    want = server.client.create_want(["c"])
    # `logs --follow` of b while it runs on the cluster: its line, then the end.
    b_run = wait_for(lambda: run_of(server, "b", "Running"), timeout=30)[0]
    followed = server.cli("logs", b_run["job_run_id"], "--follow", check=0)
    assert "line of b" in followed.stdout
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful", 60)
    runs = server.client.list_job_runs()["data"]
    assert sorted((r["partitions"][0], r["status"]) for r in runs) == [
        ("b", "Succeeded"), ("c", "DepMiss"), ("c", "Succeeded")]
    for run in runs:
        assert run["executor"] == "slurm" and run["external_id"].isdigit()
        assert squeue_state(slurm_cluster, run["external_id"]) == "COMPLETED"
    with open(os.path.join(ws, "built", "c")) as f:
        record = json.load(f)
    assert record["env"]["DATABUILD_EXECUTOR"] == "slurm"
    assert record["cwd"] == ws and record["argv"] == ["c"] and record["stdin"] == ""
    (c_ok,) = [r for r in runs if r["status"] == "Succeeded" and r["partitions"] == ["c"]]
    assert "hello from c" in server.client.logs(c_ok["job_run_id"])
    assert run_count(ws, "c") == 2 and run_count(ws, "b") == 1


def test_slurm_failure_has_the_stderr_tail_and_retries(tmp_path, slurm_cluster, serve):
    ws = slurm_workspace(tmp_path / "ws", plan={"x": {"exit": 3}, "y": {"fail_times": 1}},
                         max_retries=1)
    server = serve(ws, env=slurm_cluster.env)
    bad = server.client.create_want(["x"])
    flaky = server.client.create_want(["y"])
    wait_for(lambda: server.client.get_want(bad["want_id"])["status"] == "Failed", 60)
    wait_for(lambda: server.client.get_want(flaky["want_id"])["status"] == "Successful", 60)
    x_runs = run_of(server, "x")
    assert len(x_runs) == 2  # the retry failed too
    assert {(r["exit_code"], r["error"]) for r in x_runs} == {(3, "exit code 3: planned exit 3 for x")}
    x_ids = {r["job_run_id"] for r in x_runs}
    failures = [e for e in server.client.events(limit=1000)["data"]
                if e["type"] == "job_run_failure" and e["payload"]["job_run_id"] in x_ids]
    assert failures[0]["payload"]["stderr_tail"] == ["planned exit 3 for x"]
    assert sorted(r["status"] for r in run_of(server, "y")) == ["Failed", "Succeeded"]


def test_slurm_cancel_and_timeout_end_the_slurm_job(tmp_path, slurm_cluster, serve):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "t", "partition_patterns": ["slow"], "executor": "slurm"},
        {"label": "u", "partition_patterns": ["late"], "executor": "slurm",
         "timeout_seconds": 1}], plan={"slow": {"sleep": 120}, "late": {"sleep": 120}})
    server = serve(ws, env=slurm_cluster.env)
    server.client.create_want(["slow"])
    late = server.client.create_want(["late"])
    run = wait_for(lambda: run_of(server, "slow", "Running"), 30)[0]
    wait_for(lambda: os.path.exists(os.path.join(ws, "runs", "slow")), 30)  # it runs
    canceled = server.client.cancel_job_run(run["job_run_id"])
    assert canceled["status"] == "Canceled"
    wait_for(lambda: squeue_state(slurm_cluster, run["external_id"]) == "CANCELLED", 30)
    wait_for(lambda: server.client.get_want(late["want_id"])["status"] == "Failed", 60)
    (timed_out,) = run_of(server, "late")
    assert timed_out["error"] == "timeout"
    wait_for(lambda: squeue_state(slurm_cluster, timed_out["external_id"]) == "CANCELLED", 30)


def test_slurm_runs_outlive_the_server_and_are_re_adopted(tmp_path, slurm_cluster, serve):
    # kill -9 of the server while a Slurm run sleeps: the restarted server
    # takes the run back (no "server restarted"), and it Succeeds, run once.
    # A graceful stop leaves a run running too.
    ws = slurm_workspace(tmp_path / "ws", plan={"a": {"sleep": 4}, "b": {"sleep": 4}})
    server = serve(ws, env=slurm_cluster.env)
    want = server.client.create_want(["a"])
    run = wait_for(lambda: run_of(server, "a", "Running"), 30)[0]
    server.proc.kill()
    server.stop()
    assert squeue_state(slurm_cluster, run["external_id"]) in ("PENDING", "RUNNING")
    again = serve(ws, env=slurm_cluster.env)
    assert again.client.get_job_run(run["job_run_id"])["status"] == "Running"
    wait_for(lambda: again.client.get_want(want["want_id"])["status"] == "Successful", 60)
    assert [r["status"] for r in run_of(again, "a")] == ["Succeeded"]
    assert run_count(ws, "a") == 1
    # Graceful stop, then a start after the run ended: its outcome is recorded.
    other = again.client.create_want(["b"])
    run = wait_for(lambda: run_of(again, "b", "Running"), 30)[0]
    again.cli("stop", check=0)
    again.stop()
    wait_for(lambda: os.path.exists(os.path.join(ws, ".databuild", "logs", run["job_run_id"],
                                                 "exit_code")), 30)
    third = serve(ws, env=slurm_cluster.env)
    wait_for(lambda: third.client.get_want(other["want_id"])["status"] == "Successful", 30)
    assert [r["status"] for r in run_of(third, "b")] == ["Succeeded"]
    assert run_count(ws, "b") == 1


def test_a_slurm_job_that_vanished_is_lost_by_slurm(tmp_path, slurm_cluster, driver_for,
                                                   monkeypatch):
    # The log says the run is on Slurm job 987654, which the cluster never
    # heard of: after a restart the run fails "lost by slurm" and is retried.
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    monkeypatch.setattr(databuild.SlurmExecutor, "LOST_AFTER_SECONDS", 0.3)
    ws = slurm_workspace(tmp_path / "ws", max_retries=1)
    config = databuild.load_config(ws)
    log = databuild.EventLog(os.path.join(config.state_dir, "events.db"))
    now = time.time()
    log.append([
        ("want_create", {"want_id": "w", "partitions": ["p"], "data_timestamp": now,
                         "ttl_seconds": None, "sla_seconds": None, "priority": 0,
                         "source": {"type": "manual", "user": None}, "parent_want_id": None,
                         "root_want_id": "w", "comment": None}, now),
        ("job_run_queue", {"job_run_id": "r1", "job_label": "t", "partitions": ["p"],
                           "want_ids": ["w"], "attempt": 1, "executor": "slurm"}, now),
        ("job_run_start", {"job_run_id": "r1", "executor": "slurm",
                           "external_id": "987654"}, now)])
    log.close()
    os.makedirs(os.path.join(config.state_dir, "logs", "r1"))
    d = driver_for(ws)
    assert "r1" in d.orch._running  # taken back, not failed "server restarted"
    assert d.settle("w", 60) == databuild.SUCCESSFUL
    r1 = d.full().job_runs["r1"]
    assert (r1.status, r1.error) == (databuild.FAILED, "lost by slurm")
    assert run_count(ws, "p") == 1  # the retry, on the cluster


def test_sbatch_failure_fails_the_run_with_its_message(tmp_path, slurm_cluster, driver_for,
                                                       monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    ws = slurm_workspace(tmp_path / "ws", sbatch_options=["--partition=nosuchpartition"])
    d = driver_for(ws)
    want = d.want("p")
    assert d.settle(want["want_id"], 30) == databuild.FAILED
    (run,) = d.full().job_runs.values()
    assert run.error.startswith("cannot start job: sbatch failed:")
    assert "partition" in run.error.lower()


# -- python (warm interpreters) ---------------------------------------------------

WARM_JOB = '''
import os, sys, time
import helper  # a workspace module: a change to it restarts the warm interpreter
if __name__ == "__main__":
    for ref in sys.argv[1:]:
        plan = helper.PLAN.get(ref, {})
        for i in range(plan.get("lines", 0)):
            print("line", i)
            time.sleep(plan.get("pause", 0))
        time.sleep(plan.get("sleep", 0))
        if plan.get("raise"):
            raise ValueError("bad " + ref)
        if "exit" in plan:
            sys.exit(plan["exit"])
        os.makedirs("built", exist_ok=True)
        with open(os.path.join("built", ref), "w") as f:
            f.write(helper.VERSION + " " + os.environ["DATABUILD_JOB_RUN_ID"])
'''


def warm_workspace(path, plan=None, version="v1", **job):
    ws = write_workspace(path, jobs=[dict({
        "label": "w", "partition_patterns": ["[a-z0-9]+"], "executor": "python",
        "entrypoint": [sys.executable, "job.py"]}, **job)])
    with open(os.path.join(ws, "job.py"), "w") as f:
        f.write(WARM_JOB)
    set_helper(ws, plan or {}, version)
    return ws


HELPER = """import os
with open("imports.log", "a") as f:  # once per warm interpreter
    f.write("%%d\\n" %% os.getpid())
PLAN = %r
VERSION = %r
"""


def set_helper(ws, plan, version):
    path = os.path.join(ws, "helper.py")
    with open(path, "w") as f:
        f.write(HELPER % (plan, version))
    st = os.stat(path)  # a new mtime even within the same clock tick
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def imports(ws):
    with open(os.path.join(ws, "imports.log")) as f:
        return len(f.readlines())


def read(ws, *parts):
    with open(os.path.join(ws, *parts)) as f:
        return f.read()


def test_python_runs_are_forks_that_behave_as_local_runs(tmp_path, driver_for):
    # The test job of every other test, run warm: argv, env, cwd, stdin,
    # descriptors and outcomes as for a local run.
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "t", "partition_patterns": [".+"], "executor": "python",
         "environment": {"TEST_X": "1"}}],
        plan={"c": {"deps": ["b"]}, "x": {"exit": 3}})
    d = driver_for(ws)
    assert d.settle(d.want("c")["want_id"]) == databuild.SUCCESSFUL
    assert d.settle(d.want("x")["want_id"]) == databuild.FAILED
    runs = {(r.partitions[0], r.status, r.exit_code, r.error)
            for r in d.full().job_runs.values()}
    assert runs == {("b", "Succeeded", 0, None), ("c", "DepMiss", 0, None),
                    ("c", "Succeeded", 0, None), ("x", "Failed", 3, "exit code 3: planned exit 3 for x")}
    record = json.loads(read(ws, "built", "c"))
    assert record["argv"] == ["c"] and record["cwd"] == ws and record["stdin"] == ""
    assert record["fds"] == [0, 1, 2, 3]  # nothing of the warm interpreter leaks
    env = record["env"]
    assert env["DATABUILD_EXECUTOR"] == "python" and env["TEST_X"] == "1"
    assert env["DATABUILD_PARTITIONS"] == "c" and env["DATABUILD_JOB_LABEL"] == "t"
    run = [r for r in d.full().job_runs.values() if r.partitions == ["c"]][-1]
    assert env["DATABUILD_JOB_RUN_ID"] == run.job_run_id and run.executor == "python"
    pids = [int(line) for line in read(ws, "runs", "pids").split()]
    assert len(set(pids)) == 3 and os.getpid() not in pids  # b, c, x (a dep miss exits first)


def test_python_imports_once_and_restarts_on_a_code_change(tmp_path, driver_for):
    ws = warm_workspace(tmp_path / "ws", plan={"boom": {"raise": True}, "two": {"exit": 2}})
    d = driver_for(ws)
    assert d.settle(d.want("a", "b", "c")["want_id"]) == databuild.SUCCESSFUL
    assert imports(ws) == 1 and read(ws, "built", "a").startswith("v1 ")
    # A traceback is stderr and exit 1; sys.exit(2) is exit code 2.
    d.settle(d.want("boom")["want_id"])
    d.settle(d.want("two")["want_id"])
    runs = {r.partitions[0]: r for r in d.full().job_runs.values()}
    assert (runs["boom"].exit_code, runs["boom"].error) == (1, "exit code 1: ValueError: bad boom")
    assert runs["two"].exit_code == 2 and imports(ws) == 1
    # A workspace module it imported changes: a new warm interpreter.
    set_helper(ws, {}, "v2")
    assert d.settle(d.want("d")["want_id"]) == databuild.SUCCESSFUL
    assert read(ws, "built", "d").startswith("v2 ") and imports(ws) == 2


def test_python_import_error_fails_one_run_and_the_next_retries(tmp_path, driver_for):
    ws = warm_workspace(tmp_path / "ws")
    os.remove(os.path.join(ws, "helper.py"))
    d = driver_for(ws)
    assert d.settle(d.want("a")["want_id"]) == databuild.FAILED
    (run,) = d.full().job_runs.values()
    assert run.error == "ModuleNotFoundError: No module named 'helper'"  # the import error
    set_helper(ws, {}, "v1")
    assert d.settle(d.want("b")["want_id"]) == databuild.SUCCESSFUL


PLAIN_SCRIPT = '''
import atexit, json, os, sys, threading, time
import helper  # imported ahead by the warm interpreter (a top-level import)

ref = sys.argv[1]  # module-level work, no __main__ guard: as users write scripts
plan = helper.PLAN.get(ref, {})
os.makedirs("built", exist_ok=True)


def later():
    time.sleep(0.3)
    with open(os.path.join("built", ref + ".thread"), "w") as f:
        f.write("done")


atexit.register(lambda: open(os.path.join("built", ref + ".atexit"), "w").close())
threading.Thread(target=later).start()  # not a daemon: the run waits for it
with open(os.path.join("built", ref), "w") as f:
    json.dump({"argv0": sys.argv[0], "name": __name__, "pid": os.getpid()}, f)


def fail():
    raise ValueError("bad " + ref)


if plan.get("raise"):
    fail()
if "exit" in plan:
    sys.exit(plan["exit"])
'''


def test_python_runs_plain_scripts_as_a_cold_start_would(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{
        "label": "w", "partition_patterns": ["[a-z0-9]+"], "executor": "python",
        "entrypoint": [sys.executable, "./plain.py"]}])
    with open(os.path.join(ws, "plain.py"), "w") as f:
        f.write(PLAIN_SCRIPT)
    set_helper(ws, {"boom": {"raise": True}, "msg": {"exit": "no input for msg"},
                    "three": {"exit": 3}}, "v1")
    d = driver_for(ws)
    assert d.settle(d.want("a", "b")["want_id"]) == databuild.SUCCESSFUL
    for ref in ("a", "b"):
        record = json.loads(read(ws, "built", ref))
        assert record["argv0"] == "./plain.py" and record["name"] == "__main__"
        assert read(ws, "built", ref + ".thread") == "done"  # the thread was waited for
        assert os.path.exists(os.path.join(ws, "built", ref + ".atexit"))
    assert imports(ws) == 1  # helper imported once, ahead, for both runs
    for ref in ("boom", "msg", "three"):
        d.settle(d.want(ref)["want_id"])
    runs = {r.partitions[0]: r for r in d.full().job_runs.values()}
    assert (runs["three"].exit_code, runs["msg"].exit_code) == (3, 1)
    assert runs["msg"].error == "exit code 1: no input for msg"
    assert runs["boom"].exit_code == 1
    stderr = read(d.config.state_dir, "logs", runs["boom"].job_run_id, "stderr.log")
    lines = stderr.splitlines()
    # As `python plain.py boom` shows it: the user's frames only.
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith('  File "%s", line ' % os.path.join(ws, "./plain.py"))
    assert "<string>" not in stderr and "runpy" not in stderr
    assert lines[-1] == "ValueError: bad boom"
    assert os.path.exists(os.path.join(ws, "built", "boom.atexit"))
    # An edit of the script itself starts a new warm interpreter.
    with open(os.path.join(ws, "plain.py"), "a") as f:
        f.write("\nopen(os.path.join('built', ref + '.v2'), 'w').close()\n")
    assert d.settle(d.want("c")["want_id"]) == databuild.SUCCESSFUL
    assert os.path.exists(os.path.join(ws, "built", "c.v2")) and imports(ws) == 2


def test_python_cancel_timeout_and_live_lines(tmp_path, driver_for):
    ws = warm_workspace(tmp_path / "ws", timeout_seconds=4, plan={  # (slow is canceled first)
        "slow": {"lines": 3, "pause": 0.2, "sleep": 60}, "late": {"sleep": 60}})
    d = driver_for(ws)
    slow = d.want("slow")
    d.until(lambda s: s.job_runs_by_status[databuild.RUNNING])
    (run_id,) = d.state.job_runs_by_status[databuild.RUNNING]
    log = os.path.join(d.config.state_dir, "logs", run_id, "stdout.log")
    # Each line as it is printed (the file appears once the fork has opened it).
    d.until(lambda s: os.path.exists(log) and read(ws, log).count("line") == 3)
    pid = d.orch._running[run_id].pid
    d.orch.enqueue("cancel_job_run", job_run_id=run_id)
    d.settle(slow["want_id"])
    assert d.full().job_runs[run_id].status == databuild.CANCELED
    assert not databuild._pid_alive(pid)
    late = d.want("late")
    assert d.settle(late["want_id"]) == databuild.FAILED
    errors = [r.error for r in d.full().job_runs.values() if r.partitions == ["late"]]
    assert errors == ["timeout"]


def test_python_warm_interpreter_crash_and_idle_stop(tmp_path, serve):
    # kill -9 of the warm interpreter while a run sleeps: that run still
    # ends with its exit code (serve adopts it), the next run starts a new
    # warm interpreter; an idle one stops by itself; none outlives the server.
    ws = warm_workspace(tmp_path / "ws", plan={"nap": {"sleep": 1.5}})
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write("\n[executors.python]\nidle_seconds = 3\n")
    server = serve(ws)
    nap = server.client.create_want(["nap"])
    wait_for(lambda: run_of(server, "nap", "Running"))
    warm = warm_pids(ws)
    assert len(warm) == 1
    os.kill(warm[0], signal.SIGKILL)
    wait_for(lambda: server.client.get_want(nap["want_id"])["status"] == "Successful", 30)
    assert server.client.wait_want(server.client.create_want(["after"])["want_id"],
                                   30)["status"] == "Successful"
    assert imports(ws) == 2
    wait_for(lambda: not warm_pids(ws), 20)  # idle for 3 s: stopped
    assert server.client.wait_want(server.client.create_want(["again"])["want_id"],
                                   30)["status"] == "Successful"
    assert len(warm_pids(ws)) == 1
    server.cli("stop", check=0)
    server.stop()
    assert not warm_pids(ws)


def all_pids(ws):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-c" in argv and ws.encode() in argv and b"job.py" in argv:
            found.append(int(pid))
    return found


def warm_pids(ws):
    found = all_pids(ws)
    # The forks of a warm interpreter carry its command line: not counted.
    return [pid for pid in found if parent(pid) not in found]


def parent(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def test_python_run_left_by_a_killed_server_is_stopped_and_run_again(tmp_path, serve):
    # kill -9 of the server while a python run sleeps: at the restart the
    # fork it left (recognised by pid and start time) is stopped before its
    # run fails "server restarted" and runs again; the old warm interpreter
    # goes away once its child is gone.
    ws = warm_workspace(tmp_path / "ws", plan={"nap": {"sleep": 60}})
    server = serve(ws)
    want = server.client.create_want(["nap"])
    run = wait_for(lambda: run_of(server, "nap", "Running"))[0]
    (old_warm,) = warm_pids(ws)
    child = [p for p in all_pids(ws) if parent(p) == old_warm]
    assert len(child) == 1
    server.proc.kill()
    server.stop()
    set_helper(ws, {"nap": {"sleep": 0}}, "v2")  # the rerun is quick
    again = serve(ws)
    wait_for(lambda: again.client.get_want(want["want_id"])["status"] == "Successful", 30)
    assert not databuild._pid_alive(child[0])
    runs = {r["job_run_id"]: r for r in run_of(again, "nap")}
    assert runs[run["job_run_id"]]["error"] == "server restarted"
    assert sorted(r["status"] for r in runs.values()) == ["Failed", "Succeeded"]
    wait_for(lambda: old_warm not in warm_pids(ws), 10)



def test_slurm_timeout_counts_from_when_the_job_runs(tmp_path, slurm_cluster, serve):
    # Held in the queue for 5 s (--begin), a job with a 3 s timeout that runs
    # for 0.5 s succeeds: waiting for the cluster is not running.  (The
    # timeout leaves the job 2.5 s for slurmd's launch and a cold Python.)
    ws = slurm_workspace(tmp_path / "ws", plan={"q": {"sleep": 0.5}}, timeout_seconds=3,
                         sbatch_options=["--begin=now+5"])
    server = serve(ws, env=slurm_cluster.env)
    want = server.client.create_want(["q"])
    wait_for(lambda: server.client.get_want(want["want_id"])["terminal"], 60)
    (run,) = run_of(server, "q")
    assert run["status"] == "Succeeded", (run["error"], run["duration_ms"])
    assert run["duration_ms"] >= 4000  # it did wait in the queue


def test_python_import_that_hangs_fails_a_run(tmp_path, driver_for):
    ws = warm_workspace(tmp_path / "ws")
    with open(os.path.join(ws, "helper.py"), "a") as f:
        f.write("import time\ntime.sleep(30)\n")
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write("\n[executors.python]\nimport_timeout_seconds = 0.5\n")
    d = driver_for(ws)
    started = time.monotonic()
    assert d.settle(d.want("a")["want_id"]) == databuild.FAILED
    assert time.monotonic() - started < 10
    (run,) = d.full().job_runs.values()
    assert run.error == "the import of job.py took longer than 0.5 s"
    assert not warm_pids(ws)  # the hung interpreter is gone


def test_a_slurm_job_whose_start_never_reached_the_log_is_canceled(
        tmp_path, slurm_cluster, driver_for, monkeypatch):
    # The server died between sbatch and the commit of the start: at the
    # restart the Slurm job is found by its name and canceled, and the run
    # is retried (never two builds of one partition at once).
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    ws = slurm_workspace(tmp_path / "ws")
    config = databuild.load_config(ws)
    log = databuild.EventLog(os.path.join(config.state_dir, "events.db"))
    now = time.time()
    log.append([
        ("want_create", {"want_id": "w", "partitions": ["p"], "data_timestamp": now,
                         "ttl_seconds": None, "sla_seconds": None, "priority": 0,
                         "source": {"type": "manual", "user": None}, "parent_want_id": None,
                         "root_want_id": "w", "comment": None}, now),
        ("job_run_queue", {"job_run_id": "r1", "job_label": "t", "partitions": ["p"],
                           "want_ids": ["w"], "attempt": 1, "executor": "slurm"}, now)])
    log.close()
    slurm_id = slurm_cluster.run("sbatch", "--parsable", "--job-name=databuild-r1",
                                 "--output=/dev/null", "--wrap", "sleep 120").strip()
    wait_for(lambda: squeue_state(slurm_cluster, slurm_id) == "RUNNING", 30)
    d = driver_for(ws)
    wait_for(lambda: squeue_state(slurm_cluster, slurm_id) == "CANCELLED", 30)
    assert d.full().job_runs["r1"].error == "server restarted"
    assert d.settle("w", 60) == databuild.SUCCESSFUL


def test_python_runs_a_module_with_m_as_a_cold_start_would(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{
        "label": "m", "partition_patterns": ["[a-z0-9]+"], "executor": "python",
        "entrypoint": [sys.executable, "-m", "pkg.job", "--flag"]}])
    os.makedirs(os.path.join(ws, "pkg"))
    with open(os.path.join(ws, "pkg", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(ws, "pkg", "util.py"), "w") as f:
        f.write("PREFIX = 'from util'\n")
    with open(os.path.join(ws, "pkg", "job.py"), "w") as f:
        f.write("import os, sys\nfrom .util import PREFIX\n"
                "os.makedirs('built', exist_ok=True)\n"
                "open(os.path.join('built', sys.argv[-1]), 'w').write("
                "PREFIX + ' ' + __name__ + ' ' + ' '.join(sys.argv[1:]) + ' ' + sys.argv[0])\n")
    d = driver_for(ws)
    assert d.settle(d.want("a")["want_id"]) == databuild.SUCCESSFUL
    assert read(ws, "built", "a") == "from util __main__ --flag a " + os.path.join(
        ws, "pkg", "job.py")


# -- the orchestrator never waits for an executor (README "Writing an executor") --

FAKE_SLURM = {
    # sbatch: slow (SLURM_FAKE_DELAY), then a new job id.
    "sbatch": "import os, random, time\ntime.sleep(float(os.environ.get('SLURM_FAKE_DELAY', "
              "'0')))\nprint(random.randint(10 ** 6, 10 ** 9))\n",
    # squeue: every job asked about is RUNNING (it never ends on its own).
    "squeue": "import sys\nargs = sys.argv\nids = args[args.index('-j') + 1].split(',') "
              "if '-j' in args else []\nfor i in ids:\n    print('%s|RUNNING' % i)\n",
    # scancel: slow too (SLURM_FAKE_CANCEL_DELAY), and says whom it canceled.
    "scancel": "import os, sys, time\ntime.sleep(float(os.environ.get("
               "'SLURM_FAKE_CANCEL_DELAY', '0')))\nopen(os.environ['SLURM_FAKE_LOG'], 'a')"
               ".write(sys.argv[-1] + '\\n')\n",
}


@pytest.fixture
def fake_slurm(tmp_path):
    """sbatch, squeue and scancel stand-ins first on PATH (no cluster): for
    what the server does while they are slow."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        path = bin_dir / name
        path.write_text("#!%s\n%s" % (sys.executable, body))
        path.chmod(0o755)
    return {"PATH": "%s:%s" % (bin_dir, os.environ["PATH"]),
            "SLURM_FAKE_LOG": str(tmp_path / "scancel.log")}


def two_executors(path):
    return write_workspace(path, jobs=[
        {"label": "cluster", "partition_patterns": ["c/.+"], "executor": "slurm"},
        {"label": "here", "partition_patterns": ["l/.+"]}])


def answered_within(seconds, call):
    t0 = time.monotonic()
    result = call()
    took = time.monotonic() - t0
    assert took < seconds, "took %.2f s" % took
    return result


def test_a_slow_sbatch_delays_no_answer_and_no_local_run(tmp_path, serve, fake_slurm):
    ws = two_executors(tmp_path / "ws")
    server = serve(ws, env=dict(fake_slurm, SLURM_FAKE_DELAY="4"))
    fast = databuild.Client(server.url, timeout=10, token=server.token)
    want = answered_within(1, lambda: fast.create_want(["c/[1..6]"]))  # six sbatch of 4 s
    assert want["counts"]["total"] == 6
    answered_within(1, fast.health)
    local = answered_within(1, lambda: fast.create_want(["l/a"]))
    t0 = time.monotonic()
    assert fast.wait_want(local["want_id"], 10)["status"] == "Successful"
    assert time.monotonic() - t0 < 2  # it did not wait behind the submissions
    # The Slurm runs start once their sbatch answered (four at a time).
    wait_for(lambda: len(server.client.list_job_runs(status="Running", job_label="cluster")[
        "data"]) == 6, 20)
    runs = server.client.list_job_runs(job_label="cluster")["data"]
    assert all(r["external_id"] and r["external_id"].isdigit() for r in runs)


def test_canceling_150_slurm_runs_delays_no_answer(tmp_path, serve, fake_slurm):
    ws = two_executors(tmp_path / "ws")
    server = serve(ws, env=dict(fake_slurm, SLURM_FAKE_CANCEL_DELAY="0.05"))
    fast = databuild.Client(server.url, timeout=10, token=server.token)
    want = fast.create_want(["c/[001..150]"])
    wait_for(lambda: server.client.list_job_runs(status="Running", job_label="cluster",
                                                 limit=0)["total"] == 150, 60)
    canceled = answered_within(1, lambda: fast.cancel_want(want["want_id"]))
    assert canceled["status"] == "Canceled"
    answered_within(1, fast.health)
    local = answered_within(1, lambda: fast.create_want(["l/b"]))
    assert fast.wait_want(local["want_id"], 10)["status"] == "Successful"
    # Every Slurm job is scancel'd (about 2 s of scancel, four at a time).
    wait_for(lambda: os.path.exists(fake_slurm["SLURM_FAKE_LOG"]) and len(
        open(fake_slurm["SLURM_FAKE_LOG"]).read().split()) >= 150, 30)
