#!/usr/bin/env bash
# stop-local-slurm.sh - stop the one-node SLURM cluster started by scripts/slurm/start-local-slurm.sh
# (kdbench's test cluster; .ci/run calls it after the tests).
# Cancels all jobs, shuts down slurmctld/slurmd (scontrol shutdown), slurmdbd,
# the private mariadbd and munged - each by the PID in its pid file.
#   --purge   also delete $SLURM_LOCAL_BASE (configs, state, logs, job DB) and the
#             /etc/slurm symlinks that point into it.
# Safe to run when nothing is running.  Packages are left installed.
set -uo pipefail
BASE=${SLURM_LOCAL_BASE:-${TMPDIR:-/tmp}/kdbench-slurm}
PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=$BASE/etc/slurm.conf
log() { echo "[stop-local-slurm] $*" >&2; }

pid_of() {  # pid_of <pidfile> <comm> -> prints pid if that program runs with it
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}
stop_pid() {  # stop_pid <pid> <name> [grace seconds]
  local pid=$1 name=$2 grace=${3:-20} i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 4; i++)); do
    [ -e "/proc/$pid" ] || { log "$name ($pid) stopped"; return 0; }
    sleep 0.25
  done
  log "$name ($pid) did not exit after ${grace}s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

ctld=$(pid_of "$BASE/run/slurmctld.pid" slurmctld)
slurmd=$(pid_of "$BASE/run/slurmd.pid" slurmd)
if [ -n "$ctld" ] && [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for i in $(seq 1 80); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
  log "scontrol shutdown"
  scontrol shutdown >/dev/null 2>&1 || true
  for i in $(seq 1 60); do
    { [ -z "$ctld" ] || [ ! -e "/proc/$ctld" ]; } && { [ -z "$slurmd" ] || [ ! -e "/proc/$slurmd" ]; } && break
    sleep 0.25
  done
fi
stop_pid "$(pid_of "$BASE/run/slurmd.pid" slurmd)" slurmd
stop_pid "$(pid_of "$BASE/run/slurmctld.pid" slurmctld)" slurmctld
# job step daemons of jobs that were still running when slurmd went away
for pid in $(ps -eo pid=,comm= | awk '$2 == "slurmstepd" {print $1}'); do
  log "killing leftover slurmstepd $pid"
  kill -KILL "$pid" 2>/dev/null || true
done
stop_pid "$(pid_of "$BASE/run/slurmdbd.pid" slurmdbd)" slurmdbd
stop_pid "$(pid_of "$BASE/mysql/mysqld.pid" mariadbd)" mariadbd 60
stop_pid "$(pid_of /run/munge/munged.pid munged)" munged

if [ "$PURGE" = 1 ]; then
  for l in /etc/slurm/slurm.conf /etc/slurm/cgroup.conf; do
    if [ -L "$l" ] && [[ "$(readlink "$l")" == "$BASE"/* ]]; then rm -f "$l"; fi
  done
  rm -rf "$BASE"
  log "removed $BASE"
fi
exit 0
