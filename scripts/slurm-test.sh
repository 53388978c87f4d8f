#!/usr/bin/env bash
# A real Slurm job array captioning a folder, on a single-node cluster this script starts on this machine
# (Debian's slurm-wlm with munge; run as root): the union of the array tasks' outputs must equal a
# one-process run, with nothing missing or duplicated. Not in CI: it installs and starts system daemons.
#   ./scripts/slurm-test.sh [BLIP2_BINARY]      (default build/blip2; the bundled tiny model)
# Exit status 0 when the outputs agree. Everything it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
blip2=$(realpath "${1:-build/blip2}")
tasks=3
work=$(mktemp -d /tmp/blip2-slurm.XXXXXX)
chmod 755 "$work"
say() { echo "[slurm-test] $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a fresh key, the daemon as its own user, its socket in the work folder.
install -d -o munge -g munge -m 700 "$work/munge"
install -d -o munge -g munge -m 755 "$work/munge-run"
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$work/munge/munge.key" && chmod 400 "$work/munge/munge.key"
socket=$work/munge-run/munge.socket
runuser -u munge -- munged --key-file="$work/munge/munge.key" --socket="$socket" \
  --pid-file="$work/munge-run/munged.pid" --seed-file="$work/munge/seed" --log-file="$work/munge/munged.log"

node=$(hostname -s)
cat > "$work/slurm.conf" <<CONF
ClusterName=blip2test
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p "$work/state" "$work/spool"
export SLURM_CONF=$work/slurm.conf
ok=0
cleanup() {  # the daemons stop; the work folder stays for a look when the test failed
  scancel --quiet -u root 2>/dev/null || true
  for p in slurmd slurmctld; do [ -f "$work/$p.pid" ] && kill "$(cat "$work/$p.pid")" 2>/dev/null || true; done
  [ -f "$work/munge-run/munged.pid" ] && kill "$(cat "$work/munge-run/munged.pid")" 2>/dev/null || true
  if [ "$ok" = 1 ]; then sleep 1; rm -rf "$work"; fi
}
trap cleanup EXIT
slurmctld -i
slurmd
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -qx idle && break; sleep 1; done
sinfo -h -o %t | grep -qx idle || { say "the node did not come up"; tail -20 "$work"/slurm*.log >&2; exit 1; }

# The folder: the fixture images, twice (copies in a subfolder), so each task has several. One is a corrupt
# JPEG: recorded as failed in both runs (and the runs exit 4, "some image failed").
mkdir -p "$work/images/more"
cp tests/fixtures/images/*.png tests/fixtures/images/*.jpg "$work/images/"
cp tests/fixtures/images/*.png "$work/images/more/"
# One thread everywhere: the same arithmetic in every process (thread counts change summation orders).
common=(--max-new-tokens 8 --batch 4 --format jsonl)

cat > "$work/job.sh" <<JOB
#!/bin/bash
exec "$blip2" --threads 1 caption "$work/images" ${common[*]} \
  --output "$work/part-\$SLURM_ARRAY_TASK_ID.jsonl" --shard "\$SLURM_ARRAY_TASK_ID/\$SLURM_ARRAY_TASK_COUNT"
JOB
chmod +x "$work/job.sh"
say "sbatch --array=0-$((tasks - 1)) (work folder $work)"
sbatch --wait --quiet --array=0-$((tasks - 1)) --cpus-per-task=1 --output="$work/task-%a.log" "$work/job.sh" || true
for k in $(seq 0 $((tasks - 1))); do
  grep -q "^captioned" "$work/task-$k.log" || { say "task $k did not finish"; tail -n 5 "$work/task-$k.log" >&2; exit 1; }
done

say "one process over the same folder"
"$blip2" --threads 1 caption "$work/images" "${common[@]}" --output "$work/single.jsonl" 2>/dev/null || [ $? -eq 4 ]
python3 - "$work" "$tasks" <<'PY'
import json, sys
work, tasks = sys.argv[1], int(sys.argv[2])
load = lambda p: [json.loads(l) for l in open(p)]
single = {r["image"]: r for r in load(f"{work}/single.jsonl")}
parts = [r for k in range(tasks) for r in load(f"{work}/part-{k}.jsonl")]
images = [r["image"] for r in parts]
dup = len(images) - len(set(images))
missing = set(single) - set(images)
# The same texts (or the same error); scores to float rounding, since the rows decoded beside an image differ
# between the runs (continuous batching), and with them the products' summation order.
def same(a, b):
    if a is None or a.keys() != b.keys() or a.get("error") != b.get("error"): return False
    ca, cb = a.get("captions", []), b.get("captions", [])
    return len(ca) == len(cb) and all(x["text"] == y["text"] and abs(x["score"] - y["score"]) <= 1e-4 * abs(y["score"])
                                      for x, y in zip(ca, cb))
differ = [r["image"] for r in parts if not same(single.get(r["image"]), r)]
counts = [len(load(f"{work}/part-{k}.jsonl")) for k in range(tasks)]
print(json.dumps({"images": len(single), "per_task": counts, "duplicated": dup, "missing": sorted(missing),
                  "differing": differ}))
sys.exit(0 if dup == 0 and not missing and not differ and all(counts) else 1)
PY
say "ok: the array's union equals the one-process run"
ok=1
