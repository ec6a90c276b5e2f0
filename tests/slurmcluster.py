"""A one-node Slurm cluster for the tests and the Slurm benchmark.

``start()`` starts ``munged``, ``slurmctld`` and ``slurmd`` by hand (no
systemd) with a slurm.conf in a directory of its own and waits until the node
takes jobs; it returns a ``Cluster`` whose ``env`` (``SLURM_CONF``) the Slurm
commands need and whose ``stop()`` ends the daemons.  It needs root (the
daemons run as root) and Debian's ``slurm-wlm`` and ``munge`` packages, which
``.ci/run`` installs; ``unavailable()`` says why a cluster cannot be had here.

Also a script: ``python tests/slurmcluster.py DIR`` starts one and prints the
``SLURM_CONF`` line to export (for trying databuild's slurm executor by hand).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
MUNGE_KEY = "/etc/munge/munge.key"


def unavailable():
    """Why no cluster can be started here, or None."""
    missing = [d for d in DAEMONS + ("sbatch", "squeue", "scancel")
               if not (shutil.which(d) or shutil.which(d, path="/usr/sbin:/sbin"))]
    if missing:
        return "Slurm is not installed (no %s): apt-get install slurm-wlm munge" % ", ".join(
            missing)
    if os.geteuid() != 0:
        return "starting a Slurm cluster needs root (slurmd runs jobs as their users)"
    return None


CONF = """\
ClusterName=databuild-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=2
MessageTimeout=10
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:100
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class Cluster:
    """A running one-node cluster: ``env`` for the Slurm commands, ``stop()``."""

    def __init__(self, directory):
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pids = []

    def run(self, *argv):
        """A Slurm command against this cluster; returns its stdout."""
        return subprocess.run(argv, env=self.env, check=True, capture_output=True,
                              text=True, timeout=60).stdout

    def stop(self):
        """End slurmd and slurmctld (munged is shared: it stays)."""
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            try:
                with open(os.path.join(self.dir, pid_file)) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = os.path.join(self.dir, pid_file)
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)


def _munged_running():
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def start(directory, timeout=60):
    """Start a one-node cluster whose files live in ``directory``."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    os.makedirs(os.path.join(directory, "spool"), exist_ok=True)
    cluster = Cluster(directory)
    host = socket.gethostname().split(".")[0]
    with open(cluster.conf, "w") as f:
        f.write(CONF.format(host=host, dir=directory, ctld_port=_free_port(),
                            d_port=_free_port(), cpus=os.cpu_count() or 1))
    if not _munged_running():
        if not os.path.exists(MUNGE_KEY):
            subprocess.run([_daemon("mungekey") or "mungekey", "--create"], check=True)
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run([_daemon("munged"), "--force"], check=True)
    subprocess.run([_daemon("slurmctld"), "-f", cluster.conf], env=cluster.env, check=True)
    subprocess.run([_daemon("slurmd"), "-f", cluster.conf], env=cluster.env, check=True)
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=cluster.env,
                               capture_output=True, text=True)
        state = probe.stdout.strip()
        if probe.returncode == 0 and state in ("idle", "mixed", "allocated"):
            # The node may say idle before slurmd registered: one job to be sure.
            try:
                subprocess.run(["srun", "-t", "1", "true"], env=cluster.env, check=True,
                               capture_output=True, timeout=max(1, deadline - time.monotonic()))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                break
            return cluster
        time.sleep(0.2)
    cluster.stop()
    raise RuntimeError("the Slurm node did not come up in %d s (state %r; see %s)"
                       % (timeout, state, os.path.join(directory, "slurmctld.log")))


if __name__ == "__main__":
    where = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "slurm-cluster")
    started = time.monotonic()
    c = start(where)
    print("Cluster up in %.1f s. For the Slurm commands and databuild:" % (
        time.monotonic() - started))
    print("export SLURM_CONF=%s" % c.conf)
