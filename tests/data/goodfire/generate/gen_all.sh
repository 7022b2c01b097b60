#!/usr/bin/env bash
# Rebuild every fixture in tests/data/goodfire/ from Goodfire's public spd code.
#
# Needs: a git mirror of github.com/goodfire-ai/spd (SPD_MIRROR), and a Python 3.11 venv (PY)
# with: torch 2.13.0+cpu, pydantic 2.11.10, transformers 4.57.3, einops 0.8.1, jaxtyping 0.3.4,
# wandb 0.23.1, wandb-workspaces 0.1.12, datasets 4.4.2, matplotlib 3.10.8, pillow 12.0.0,
# fire 0.7.1, python-dotenv 1.2.1, pyyaml (see README.md). Nothing is written outside SCRATCH
# except the fixture directories themselves.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="$(dirname "$HERE")"                       # tests/data/goodfire
SPD_MIRROR="${SPD_MIRROR:-/work/.mirror/goodfire-ai+spd/repo}"
PY="${PY:-/tmp/gf_env/bin/python}"
SCRATCH="${SCRATCH:-/tmp/gf_scratch}"
MAIN_SHA=3f0bb61ebb56c493f8de5c21618d866bbed60298
DEV_SHA=2ab728c04940a71ee34948733e0c10e322367509

rm -rf "$SCRATCH"; mkdir -p "$SCRATCH/src/main" "$SCRATCH/src/dev" "$SCRATCH/build" "$SCRATCH/verify" "$SCRATCH/out"
git -C "$SPD_MIRROR" archive "$MAIN_SHA" | tar -x -C "$SCRATCH/src/main"
git -C "$SPD_MIRROR" archive "$DEV_SHA"  | tar -x -C "$SCRATCH/src/dev"
echo "$MAIN_SHA" > "$SCRATCH/src/main/.commit"
echo "$DEV_SHA"  > "$SCRATCH/src/dev/.commit"
export SPD_OUT_DIR="$SCRATCH/out" PYTHONHASHSEED=0 OMP_NUM_THREADS=1

build() {  # build <script> <name> <main|dev>
  local script=$1 name=$2 src=$3
  SPD_SRC="$SCRATCH/src/$src" GF_WORKSPACE="$SCRATCH/build/$name" \
    "$PY" "$HERE/$script" "$name" "$SCRATCH/build/$name" > "$SCRATCH/$name.log" 2>&1
}
ref() {  # ref <name> <main|dev>
  SPD_SRC="$SCRATCH/src/$2" "$PY" "$HERE/make_reference.py" "$SCRATCH/build/$1" "$SCRATCH/verify/$1"
}

for n in tms-5-2-tied tms-5-2-id resid-mlp-1; do build gen_toy.py $n main; ref $n main; done
build gen_toy.py dev-layerwise dev; ref dev-layerwise dev
for n in llama-simple-mlp llama-simple gpt2-simple hf-gpt2; do build gen_lm.py $n main; ref $n main; done
build gen_lm.py dev-global dev; ref dev-global dev
SPD_SRC="$SCRATCH/src/main" "$PY" "$HERE/gen_old_keys.py" "$SCRATCH/build/tms-5-2-tied" "$SCRATCH/build/old-keys"
ref old-keys main
SPD_SRC="$SCRATCH/src/main" "$PY" "$HERE/gen_old_keys.py" "$SCRATCH/build/gpt2-simple" "$SCRATCH/build/old-keys-gpt2-simple"
ref old-keys-gpt2-simple main

for d in "$SCRATCH"/build/*/; do
  n=$(basename "$d"); rm -rf "${DEST:?}/$n"; cp -r "$d" "$DEST/$n"
done
"$PY" "$HERE/write_manifest.py" "$DEST"
du -sh "$DEST"
