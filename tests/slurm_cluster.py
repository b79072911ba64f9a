"""A one-node SLURM cluster on 127.0.0.1 for the launcher's tests: Debian's munge, slurmctld and slurmd, started as
root with every file under one temporary directory (its slurm.conf is what `SLURM_CONF` names), stopped by the pids
they write (munged too, when started here). SLURM and munge come from apt-get (the Makefile's test target installs
them)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
MUNGE_DIRS = ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge")


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [name for name in (*DAEMONS, "sbatch", "squeue", "scontrol", "srun") if shutil.which(name) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found): apt-get install slurmctld slurmd munge"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


MUNGE_PID_FILE = "/run/munge/munged.pid"


def _start_munge() -> bool:
    """munged as the munge user (it refuses to run without its directories, owned by that user); a daemon already
    running is used as it is. Returns whether it was started here."""
    if _munge_works():
        return False
    for directory in MUNGE_DIRS:
        os.makedirs(directory, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], check=True)
    for _ in range(50):
        if _munge_works():
            return True
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n | unmunge` fails")


class SlurmCluster:
    """slurmctld and slurmd on this host (CPUs of this machine, a memory below its own), with its configuration in
    `directory`. `environment` points SLURM's commands at it."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.conf = directory / "slurm.conf"
        host = socket.gethostname().split(".")[0]
        controller_port, node_port = _free_ports(2)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        for sub in ("state", "spool"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=dit-scaling-tests", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_port}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "SchedulerType=sched/backfill", "MinJobAge=600", "KillWait=10", "MpiDefault=none",
            f"StateSaveLocation={directory / 'state'}", f"SlurmdSpoolDir={directory / 'spool'}",
            f"SlurmctldPidFile={directory / 'slurmctld.pid'}", f"SlurmdPidFile={directory / 'slurmd.pid'}",
            f"SlurmctldLogFile={directory / 'slurmctld.log'}", f"SlurmdLogFile={directory / 'slurmd.log'}",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.environment = {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._started_munge = _start_munge()
        env = {**os.environ, **self.environment}
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=env, check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the node did not come up within {timeout:.0f} s; see {self.directory}/*.log")

    def stop(self) -> None:
        pid_files = [self.directory / f"{daemon}.pid" for daemon in ("slurmd", "slurmctld")]
        if getattr(self, "_started_munge", False):
            pid_files.append(pathlib.Path(MUNGE_PID_FILE))
        for pid_file in pid_files:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        time.sleep(0.5)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM command (squeue, scontrol, ...) against this cluster."""
        return subprocess.run(command, env={**os.environ, **self.environment}, capture_output=True, text=True,
                              check=check)
