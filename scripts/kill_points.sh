#!/bin/bash
# kill -9 + --resume among real vae jobs coming and going: are the weights bit-identical to a run alone?
#
#   bash scripts/kill_points.sh OUT N [recipe overrides...]     (EPOCHS=30 by default; SRC=checkout to test)
#
# A reference `vae train digits` alone; then N times: the same training, a peer training that starts
# partway, a `--resume` into the live run folder (refused by the lock, exit 75: it must not count as a
# peer), kill -9 at a random moment, then `--resume` while another peer starts and ends. Each resumed
# model's tensors are hashed (metadata aside) against the reference. Prints one line a kill point and
# `same=S diff=D`. Every run shares the CPU-sharing folder OUT/share, so the runs see each other as peers.
set -u
OUT=$1; N=$2; shift 2
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}; PY=${PY:-$SRC/.venv/bin/python}; EPOCHS=${EPOCHS:-30}
V() { PYTHONPATH=$SRC "$PY" -m vae_cli "$@"; }
VB() { PYTHONPATH=$SRC exec "$PY" -m vae_cli "$@"; }  # for `&`: then $! is python itself, not a subshell
rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT" || exit 1
export VAE_CPU_SHARE=$OUT/share; mkdir -m 0700 share
digest() { "$PY" -c "
from safetensors.numpy import load_file; import hashlib, sys
d = load_file(sys.argv[1]); h = hashlib.sha256()
for k in sorted(d): h.update(k.encode()); h.update(d[k].tobytes())
print(h.hexdigest()[:16])" "$1"; }
stop() { jobs -p | grep -qx "$1" && kill -9 "$1"; wait "$1" 2>/dev/null; }  # only a job still running
V train digits epochs="$EPOCHS" "$@" --name ref --quiet >/dev/null 2>&1 || { echo "reference run failed"; exit 1; }
REF=$(digest runs/ref/model.safetensors); echo "reference $REF"
same=0; diff=0
for k in $(seq 1 "$N"); do
  VB train digits epochs="$EPOCHS" "$@" --name "k$k" --quiet >/dev/null 2>&1 & P=$!
  sleep "0.$((RANDOM % 9 + 1))"; VB train digits epochs=3 --name "peer$k" --quiet >/dev/null 2>&1 & Q=$!
  while [ ! -f "runs/k$k/recipe.yaml" ]; do sleep 0.05; done
  V train digits epochs="$EPOCHS" "$@" --name "k$k" --resume --quiet >/dev/null 2>&1; lock=$?
  sleep "$((RANDOM % 3)).$((RANDOM % 10))"; stop "$P"
  at=$(($(grep -c . "runs/k$k/metrics.csv" 2>/dev/null || echo 1) - 1))
  stop "$Q"
  VB train digits epochs="$EPOCHS" "$@" --name "k$k" --resume --quiet >/dev/null 2>"err$k" & P=$!
  sleep "1.$((RANDOM % 10))"; V train digits epochs=1 --name "peerb$k" --quiet >/dev/null 2>&1
  wait "$P"; rc=$?
  line="k$k: lock-refused run exit $lock, killed after $at epochs"
  if [ $rc != 0 ]; then diff=$((diff + 1)); echo "$line; resume exit $rc: $(tail -c 200 "err$k")"; continue; fi
  h=$(digest "runs/k$k/model.safetensors")
  if [ "$h" = "$REF" ]; then same=$((same + 1)); echo "$line; same"; else diff=$((diff + 1)); echo "$line; DIFFERENT $h"; fi
done
echo "same=$same diff=$diff"
