#!/bin/bash
# A one-machine Slurm (munged, slurmctld, slurmd as one node with all its cores), to try
# `moe-testbed ladder --executor slurm` without a cluster; .ci/run starts it for the tests
# marked `slurm`. Needs root; on Debian/Ubuntu it installs slurm-wlm and munge with
# apt-get when they are missing.
#
#   configs/slurm/start-local.sh          start (a running one is left as it is)
#   configs/slurm/start-local.sh stop     stop the daemons
#
# It writes /etc/slurm/slurm.conf (refusing to replace one it did not write), state under
# /var/spool/moe-slurm, logs under /var/log/slurm. Completed jobs stay visible to
# `scontrol show job` for 10 minutes (MinJobAge), which `ladder --status` reads.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
MARK="# written by moe-testbed configs/slurm/start-local.sh"
STATE=/var/spool/moe-slurm

if [ "${1:-start}" = stop ]; then
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "error: start-local.sh needs root (it starts daemons)" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "error: $CONF exists and was not written by this script; not replacing it" >&2; exit 2
fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge
cat > "$CONF" <<CONF
$MARK
ClusterName=moe-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
DefMemPerCPU=$((MEM / CPUS))
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
chown -R munge:munge /run/munge /etc/munge
[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        sinfo; exit 0
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "error: the local Slurm node did not come up; see /var/log/slurm/" >&2
exit 1
