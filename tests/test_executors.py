"""Executors (SPEC 9): the config of executors, per-executor limits, and the
Slurm executor against a real one-node cluster (``slurm_cluster``: skipped,
saying why, where Slurm cannot be installed; CI always has it)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import databuild
from conftest import MODULE, TEST_JOB, run_count, wait_for, write_workspace

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
    config.executors["local"] = {"max_concurrent_job_runs": 7}
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
    failures = [e for e in server.client.events(limit=1000)["data"]
                if e["type"] == "job_run_failure"]
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
