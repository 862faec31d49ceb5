#!/bin/bash
# Checks scripts/slurm/train.sbatch on one machine without GPUs:
# a one-node SLURM cluster on localhost runs the sbatch script with 2 tasks x 2 fake CPU
# devices (--distributed, digits, 2 steps), then 1 process x 4 devices trains the same run,
# and the two final states and losses are compared (as tests/test_parallel.py does).
#
#   apt-get install -y slurm-wlm munge      # Debian 12: slurm-wlm 22.05
#   bash scripts/slurm/verify_local.sh      # as root, from the project root, venv active
#
# It writes /etc/slurm/slurm.conf (a one-node cluster) and starts munged, slurmctld and
# slurmd if they are not running. Exit 0 when the runs agree within 3e-3 (tests/test_parallel.py's
# CLOSE), 1 otherwise.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT_DIR:-/tmp/slurm_check}
host=$(hostname -s)
if ! pgrep -x munged >/dev/null; then   # munge: SLURM's authentication between daemons and clients
  mkdir -p /run/munge && chown munge:munge /run/munge
  su -s /bin/sh munge -c /usr/sbin/munged
fi
if ! pgrep -x slurmctld >/dev/null; then
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  slurmctld && slurmd && sleep 3
fi
sinfo
rm -rf "$out" && mkdir -p "$out"
run=(--config=digits:resnet8 --config.train.total_steps=2 --config.train.batch_size=32
     --config.train.eval_batch_size=120 --config.train.log_every=1 --config.train.eval_every=2
     --config.train.checkpoint_every=2 --config.train.steps_per_dispatch=1 --config.train.progress=False
     "--config.data.train_split=train[:512]" "--config.data.eval_splits=test=test[:120]")
cd "$root"
# 1 node x 2 tasks, no GPUs: the sbatch script as written, its #SBATCH GPU lines overridden.
XLA_FLAGS=--xla_force_host_platform_device_count=2 sbatch --wait --nodes=1 --ntasks-per-node=2 \
  --gpus-per-node=0 --cpus-per-task=1 --time=10 --output="$out/slurm-%j.out" \
  scripts/slurm/train.sbatch "${run[@]}" --workdir="$out/two_processes"
grep -v Gloo "$out"/slurm-*.out
XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m resnet_jax.main "${run[@]}" \
  --workdir="$out/one_process" | grep -v Gloo
cd "$root/tests" && python - "$out" <<'PY'
import sys
from helpers import max_abs_diff, restore_state
from resnet_jax import reporting
out = sys.argv[1]
two, step_two = restore_state(f"{out}/two_processes")
one, step_one = restore_state(f"{out}/one_process")
diff = max(max_abs_diff(two.params, one.params), max_abs_diff(two.batch_stats, one.batch_stats))
losses = {name: [(r["step"], r["split"], round(r["loss"], 6)) for r in reporting.read_metrics(f"{out}/{name}")]
          for name in ("two_processes", "one_process")}
print(f"steps {step_two} / {step_one}; max |difference| of params and BN statistics: {diff:.3g}")
for name, rows in losses.items():
    print(f"{name}: (step, split, loss) {rows}")
train = lambda rows: [r for r in rows if r[1] == "train"]
ok = step_two == step_one == 2 and diff < 3e-3 and train(losses["two_processes"]) == train(losses["one_process"])
print("agree" if ok else "DIFFER")
sys.exit(0 if ok else 1)
PY
