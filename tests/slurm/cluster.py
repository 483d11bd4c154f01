"""A one-node SLURM cluster on localhost for tests, with every file under one folder.

``with local_cluster(folder) as cluster:`` starts munged (its own key and socket), slurmctld and
slurmd (Debian's slurm-wlm) as foreground processes, waits until the node is idle and yields a
:class:`Cluster` whose ``env`` points the SLURM commands at this cluster (``SLURM_CONF``) and puts
an ``srun`` wrapper first on ``PATH``. On exit it stops the three daemons it started, by pid.

Needs root (slurmd starts jobs as their user) and the binaries munged, slurmctld, slurmd,
sbatch, squeue and srun. Accounting is off, so Snakemake must poll job states with squeue
(``slurm-status-command: squeue``); ``MinJobAge`` keeps finished jobs visible to squeue for
far longer than Snakemake's first status check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "sinfo")
PARTITION = "debug"


def missing_binaries() -> list[str]:
    """SLURM and munge programs not found on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running local cluster: its folder, environment and daemon processes."""

    folder: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def log(self, name: str) -> str:
        """A daemon's log file (munged, slurmctld or slurmd)."""
        path = self.folder / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def write_config(folder: Path, cpus: int, memory_mb: int, min_job_age: int = 300) -> Path:
    """slurm.conf for one node (localhost) and one partition, all state under ``folder``."""
    for sub in ("state", "spool", "log", "run"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=livermsc-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder / "munge" / "munge.socket.2"}
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "run" / "slurmctld.pid"}
SlurmdPidFile={folder / "run" / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge={min_job_age}
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _srun_wrapper(folder: Path, conf: Path) -> Path:
    """An ``srun`` that sets SLURM_CONF: the job-step plugin drops it from the job's env."""
    bindir = folder / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "srun"
    wrapper.write_text(f"#!/bin/sh\nSLURM_CONF={conf} exec {_which('srun')} \"$@\"\n")
    wrapper.chmod(0o755)
    return bindir


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_cluster(folder: Path, cpus: int | None = None, memory_mb: int = 16000,
                  start_timeout: float = 60) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd under ``folder``; stop them (by pid) on exit."""
    folder = Path(folder)
    cpus = cpus or os.cpu_count() or 2
    keydir, sockdir = folder / "munge-key", folder / "munge"
    keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sockdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    (folder / "log").mkdir(parents=True, exist_ok=True)
    key = keydir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = write_config(folder, cpus, memory_mb)
    env = {**os.environ, "SLURM_CONF": str(conf),
           "PATH": f"{_srun_wrapper(folder, conf)}{os.pathsep}{os.environ.get('PATH', '')}"}
    cluster = Cluster(folder=folder, env=env)
    commands = {
        "munged": [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                   f"--socket={sockdir / 'munge.socket.2'}",
                   f"--pid-file={folder / 'run' / 'munged.pid'}",
                   f"--log-file={folder / 'log' / 'munged.log'}",
                   f"--seed-file={keydir / 'munged.seed'}"],
        "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        "slurmd": [_which("slurmd"), "-D", "-N", "localhost", "-f", str(conf)],
    }
    try:
        (folder / "run").mkdir(exist_ok=True)
        for name, cmd in commands.items():
            out = (folder / "log" / f"{name}.out").open("w")
            cluster.daemons[name] = subprocess.Popen(cmd, env=env, stdout=out,
                                                     stderr=subprocess.STDOUT)
            if name == "munged":
                _wait(lambda: (sockdir / "munge.socket.2").exists(), start_timeout,
                      "munged socket", cluster)
        _wait(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%t").stdout, start_timeout,
              "an idle node", cluster)
        yield cluster
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.daemons:
                _stop(cluster.daemons[name])


def _wait(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.daemons.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}:\n"
                               + "\n".join(cluster.log(n)[-2000:] for n in dead))
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"no {what} after {timeout} s:\n" + cluster.log("slurmctld")[-2000:]
                       + cluster.log("slurmd")[-2000:])
