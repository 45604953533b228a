#!/usr/bin/env bash
# start-local-slurm.sh - install, configure and start a real single-node SLURM cluster on this
# machine (Debian/Ubuntu packages: slurmctld, slurmd, slurm-client, munge, slurmdbd + a private
# MariaDB for accounting; no systemd needed; runs as root).
#
# kdbench uses it for its SLURM tests (.ci/run starts it before pytest and stops it after; the
# pytest fixture `slurm` in tests/conftest.py starts it when it is not running), and a developer can
# use it to try `kdbench run SUITE --executor slurm` on a laptop:
#     sudo scripts/slurm/start-local-slurm.sh && kdbench run suites/quickstart.yaml --executor slurm
#     sudo scripts/slurm/stop-local-slurm.sh            # (--purge also deletes state, logs, job DB)
#
# Idempotent: packages are installed only when missing, configs are (re)written, and each daemon
# is started only when it is not already running. Safe to run again on a running cluster (it only
# re-checks health). About a minute on a bare machine (apt), a few seconds once installed.
#
# Daemons: munged (as user munge), [mariadbd + slurmdbd], slurmctld, slurmd.
# Accounting (slurmdbd + MariaDB) is ON by default because submitit and `kdbench status` rely on
# `sacct` to learn the state of jobs that end without writing a result (cancelled, killed, time
# limit). SLURM_LOCAL_ACCOUNTING=0 skips it.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_BASE        state/config/log dir      (default ${TMPDIR:-/tmp}/kdbench-slurm)
#   SLURM_LOCAL_ACCOUNTING  1 = slurmdbd+MariaDB, 0 = none   (default 1)
#   SLURM_LOCAL_CPUS        CPUs advertised for the node (default: nproc, at least 8). May exceed the
#                           real core count (SlurmdParameters=config_overrides) so that test arrays,
#                           a DDP job and a long time-limit job run side by side on a 2-core machine.
#   SLURM_LOCAL_PARTITION   partition name            (default debug)
#   SLURM_LOCAL_LINK_ETC    1 = symlink /etc/slurm/slurm.conf to the generated config
#                           so slurm commands work without SLURM_CONF (default 1)
#   SLURM_LOCAL_DB_PORT     TCP port of the private MariaDB on 127.0.0.1 (default 3307)
#   SLURM_LOCAL_CRED_EXPIRE AuthInfo=cred_expire; also the delay before a requeued job
#                           (submitit checkpoint/requeue) may start again (default 30,
#                           Slurm's default is 120)
#
# After it returns 0:  sinfo / srun / sbatch / sacct work, and
#   source "$SLURM_LOCAL_BASE/slurm-env.sh"   exports SLURM_CONF (only needed
#   when SLURM_LOCAL_LINK_ETC=0).
#
# Facts this relies on (learned the hard way): munged refuses to run as root; slurm commands need
# /etc/slurm/slurm.conf or SLURM_CONF; without slurmdbd submitit never learns that a cancelled job
# ended; slurmd 22.05 always loads a cgroup plugin (CgroupPlugin=autodetect + IgnoreSystemd=yes);
# submitit's job process ignores SIGTERM (KillWait=5); a requeued job waits cred_expire before it
# starts again; a fresh state dir restarts job ids at 1 (time-based FirstJobId); daemons must be
# detached from the caller's file descriptors or a CI runner hangs on them; SLURM checks time
# limits and --signal warnings about every 30 s.
set -euo pipefail

BASE=${SLURM_LOCAL_BASE:-${TMPDIR:-/tmp}/kdbench-slurm}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
CPUS=${SLURM_LOCAL_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
LINK_ETC=${SLURM_LOCAL_LINK_ETC:-1}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
REQUEUE_DELAY=${SLURM_LOCAL_CRED_EXPIRE:-30}
CLUSTER=localcluster

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=$BASE/etc/slurm.conf
T0=$(date +%s)

log() { echo "[start-local-slurm +$(( $(date +%s) - T0 ))s] $*" >&2; }
die() {
  echo "[start-local-slurm] ERROR: $*" >&2
  for f in "$BASE"/log/*.log "$BASE"/log/daemons.out "$BASE"/mysql/mariadb.err /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
# wait_for <seconds> <description> <command...>
wait_for() {
  local secs=$1 what=$2; shift 2
  local i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for: $what"
}
# run_detached <cmd...>: start a program in the background, in its own session,
# with stdin on /dev/null, stdout/stderr appended to $BASE/log/daemons.out and
# WITHOUT any inherited file descriptor > 2.  No shell stays behind holding the
# caller's stdout/stderr (a CI runner waiting for EOF on its pipe would hang).
# Daemons that fork themselves (munged, slurm*) are fine with this too.
run_detached() {
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
    done
    setsid "$@" </dev/null >>"$BASE/log/daemons.out" 2>&1 &
  )
}
# alive <pidfile> <comm>: the pid in the file is running and is that program
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

[ "$(id -u)" = 0 ] || { echo "[start-local-slurm] ERROR: must run as root (it installs packages and starts daemons): sudo $0" >&2; exit 2; }
command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
  { echo "[start-local-slurm] ERROR: needs a Debian/Ubuntu system (dpkg, apt-get)" >&2; exit 2; }

# --------------------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # Keep the packages' maintainer scripts from trying to start the daemons via
  # init scripts (no systemd here); we start them ourselves below.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  ok=0
  for attempt in 1 2 3; do
    if apt-get -o DPkg::Lock::Timeout=120 update -qq &&
       apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends $missing \
         > "${TMPDIR:-/tmp}/start-local-slurm-apt.log" 2>&1; then
      ok=1; break
    fi
    log "apt attempt $attempt failed (see ${TMPDIR:-/tmp}/start-local-slurm-apt.log), retrying"
    sleep 5
  done
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || { tail -n 30 "${TMPDIR:-/tmp}/start-local-slurm-apt.log" >&2; die "apt-get install failed"; }
  log "packages installed"
fi

# --------------------------------------------------------------------------- 2. dirs, host name
mkdir -p "$BASE"/{etc,run,log,state/ctld,state/d}
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null 2>&1; then
  log "host name $HOST does not resolve; adding it to /etc/hosts"
  echo "127.0.0.1 $HOST" >> /etc/hosts
fi

# --------------------------------------------------------------------------- 3. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge        # tmpfiles.d does this under systemd
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! (munge -n </dev/null | unmunge) >/dev/null 2>&1; then
  log "starting munged"
  # munged refuses to run as root when its dirs are owned by munge ("Logfile is
  # insecure: invalid ownership"), so run it as the munge user.  It daemonizes
  # and writes /run/munge/munged.pid.
  run_detached runuser -u munge -- /usr/sbin/munged
  wait_for 20 "munge round trip" sh -c 'munge -n </dev/null | unmunge'
fi

# --------------------------------------------------------------------------- 4. MariaDB + slurmdbd
if [ "$ACCOUNTING" = 1 ]; then
  MY=$BASE/mysql
  install -d -o mysql -g mysql -m 0750 "$MY" "$MY/data"
  if [ ! -d "$MY/data/mysql" ]; then
    log "initialising MariaDB datadir"
    mariadb-install-db --user=mysql --datadir="$MY/data" --auth-root-authentication-method=socket \
      --skip-test-db > "$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
  fi
  if ! mariadb-admin --socket="$MY/mysqld.sock" ping >/dev/null 2>&1; then
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    run_detached /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MY/data" \
      --socket="$MY/mysqld.sock" --pid-file="$MY/mysqld.pid" --log-error="$MY/mariadb.err" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
      --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
    wait_for 60 "mariadbd" mariadb-admin --socket="$MY/mysqld.sock" ping
  fi
  mariadb --socket="$MY/mysqld.sock" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmdbpass';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "MariaDB user setup failed"
fi

# --------------------------------------------------------------------------- 5. config files
# A fresh StateSaveLocation restarts job ids at 1, and submitit folders like
# ".../%j" of an earlier cluster would then hand back stale results.  Pick a
# time-based first job id once per state dir (max 67108863).
[ -s "$BASE/state/first_job_id" ] || echo $(( ($(date +%s) % 600000) * 100 + 1 )) > "$BASE/state/first_job_id"
FIRST_JOB_ID=$(cat "$BASE/state/first_job_id")
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM * 9 / 10 ))          # a bit less than detected, so the node never drains
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

new_conf=$(cat <<EOF
# generated by start-local-slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$REQUEUE_DELAY
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroup-based plugins. NB: slurmd 22.05 still loads a cgroup plugin (autodetect -> v1 here)
# and dies if that fails; see cgroup.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
$ACCT
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=10
# submitit ignores SIGTERM; a short KillWait makes scancel/timeouts free the CPU fast
KillWait=5
ReturnToService=2
FirstJobId=$FIRST_JOB_ID
SlurmdParameters=config_overrides
MailProg=/bin/true
NodeName=$HOST NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$SLURM_CONF"
  conf_changed=1
fi
printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > "$BASE/etc/cgroup.conf"
: > "$BASE/etc/plugstack.conf"
if [ "$ACCOUNTING" = 1 ]; then
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it must be
  # owned by SlurmUser and mode 600.
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
fi
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" > "$BASE/slurm-env.sh"
if [ "$LINK_ETC" = 1 ]; then
  mkdir -p /etc/slurm
  ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
  ln -sfn "$BASE/etc/cgroup.conf" /etc/slurm/cgroup.conf
fi

# a changed config on a running cluster: restart slurmctld/slurmd
if [ "$conf_changed" = 1 ] && { alive "$BASE/run/slurmctld.pid" slurmctld || alive "$BASE/run/slurmd.pid" slurmd; }; then
  log "config changed: restarting slurmctld/slurmd"
  for d in slurmd slurmctld; do
    alive "$BASE/run/$d.pid" "$d" && kill "$(cat "$BASE/run/$d.pid")" || true
  done
  wait_for 30 "old slurm daemons to exit" sh -c "! [ -e /proc/\$(cat '$BASE/run/slurmctld.pid' 2>/dev/null || echo x)/comm ] && ! [ -e /proc/\$(cat '$BASE/run/slurmd.pid' 2>/dev/null || echo x)/comm ]"
fi

# --------------------------------------------------------------------------- 6. slurm daemons
if [ "$ACCOUNTING" = 1 ]; then
  if ! alive "$BASE/run/slurmdbd.pid" slurmdbd; then
    log "starting slurmdbd"
    run_detached slurmdbd
  fi
  wait_for 60 "slurmdbd (sacctmgr list cluster)" sacctmgr -n -P list cluster
fi
if ! alive "$BASE/run/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  run_detached slurmctld
fi
wait_for 60 "slurmctld (scontrol ping)" sh -c 'scontrol ping | grep -q UP'
if ! alive "$BASE/run/slurmd.pid" slurmd; then
  log "starting slurmd"
  run_detached slurmd
fi
node_ok() { sinfo -h -N -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
for i in $(seq 1 60); do node_ok && break; sleep 0.25; done
if ! node_ok; then
  # a node left DOWN/DRAINED by an earlier run: resume it once
  scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
fi
wait_for 60 "node $HOST to be usable (sinfo)" node_ok
if [ "$ACCOUNTING" = 1 ]; then
  # slurmctld registers the cluster in slurmdbd by itself; wait until it did,
  # otherwise the first jobs might not show up in sacct.
  wait_for 60 "cluster $CLUSTER registered in slurmdbd" sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
log "cluster up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')(SLURM_CONF=$SLURM_CONF)"
