#!/usr/bin/env bash
# GPU readiness check: on a machine with an NVIDIA GPU, installs flaxtag with JAX's CUDA build in a virtualenv, then
# times training and inference of the four models (fp32 and bf16, batch 16 and a large batch) with
# benchmarks/train_throughput.py and benchmarks/inference_throughput.py, and writes everything to ONE JSON file. Meant to
# finish in under 8 minutes: runs go most important first (batch 16, then the large batch in bf16, then in fp32) and
# whatever the time budget leaves out is listed as skipped, a run it stops as failed (on an H200, 2026-12-04, each of
# the eight runs took about a minute, compiles included, so the default budget holds seven).
#
#   bash benchmarks/gpu_check.sh                          # → build/gpu_check.json
#   bash benchmarks/gpu_check.sh --out gpu.json --large-batch 128
#   bash benchmarks/gpu_check.sh --skip-install --python .venv/bin/python --allow-cpu --models raw_cnnl \
#     --batch-sizes 8 --steps 1                           # the same path on the CPU, as tests/test_gpu_check.py does
#
# The install needs PyPI (or a wheel cache through PIP_FIND_LINKS): jax[cuda13] if the driver supports CUDA 13
# (nvidia-smi's "CUDA Version"), else jax[cuda12]. It is skipped when the virtualenv's JAX already runs on the GPU.
# On an offline machine whose Python already has JAX for its GPU (with flax, optax, orbax-checkpoint), fetch the few
# other packages the benchmarks import where pip can reach PyPI, carry the folder over, and install from it there:
#   bash benchmarks/gpu_check.sh --download-wheels build/gpu_wheels [--wheel-python 3.12]     # here, then exits
#   bash benchmarks/gpu_check.sh --skip-install --python python3 --wheels build/gpu_wheels    # there
# --e2e-data DIR first trains, stops, resumes and evaluates a tiny run with the real commands there, on the data set
# that benchmarks/gpu_end_to_end.py says how to build (here: it needs FluidSynth), and leaves its files in end_to_end/
# beside the JSON; `gpu_end_to_end.py --compare` then evaluates that checkpoint here (--e2e-budget: its seconds).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$REPO/build/gpu_check.json
VENV=$REPO/build/gpu_venv
PYTHON=""
INSTALL=1
ALLOW_CPU=0
MODELS=spec_att,raw_att,spec_cnnp,raw_cnnl
LARGE_BATCH=256
BATCH_SIZES=""
STEPS=5
BUDGET_S=460  # of the 8 minutes, all but a margin for writing the JSON
WHEELS=""
DOWNLOAD_WHEELS=""
WHEEL_PYTHON=3.12
E2E_DATA=""
E2E_BUDGET_S=180
# What the benchmarks and the end-to-end run import beyond a CUDA JAX stack with flax, optax, orbax-checkpoint and
# common packages (the lent H200s' image), as module=requirement: the versions flaxtag is tested with.
WHEEL_DEPS="ml_collections=ml-collections==1.1.0 soundfile=soundfile==0.14.0 soxr=soxr==1.1.0 _cffi_backend=cffi==2.1.1
  pycparser=pycparser==3.12 tensorflow_datasets=tensorflow-datasets==4.9.10 array_record=array-record==0.8.6
  grain=grain==0.2.18 tree=dm-tree==0.1.10 immutabledict=immutabledict==4.3.1 simple_parsing=simple-parsing==0.1.9
  docstring_parser=docstring-parser==0.18.0 tensorflow_metadata=tensorflow-metadata==1.21.0
  google.api=googleapis-common-protos==1.76.0 termcolor=termcolor==3.3.0 toml=toml==0.10.2 portpicker=portpicker==1.6.0
  importlib_resources=importlib-resources==7.1.0 tensorboardX=tensorboardX==2.6.5"
# Published as source only (pure Python): built into wheels here.
SOURCE_WHEEL_DEPS="promise=promise==2.3"

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$(realpath -ms "$2"); shift 2 ;;
    --venv) VENV=$(realpath -ms "$2"); shift 2 ;;
    --python) case $2 in */*) PYTHON=$(realpath -ms "$2") ;; *) PYTHON=$2 ;; esac; shift 2 ;;  # a path, or on PATH
    --skip-install) INSTALL=0; shift ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --models) MODELS=$2; shift 2 ;;
    --large-batch) LARGE_BATCH=$2; shift 2 ;;
    --batch-sizes) BATCH_SIZES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --budget) BUDGET_S=$2; shift 2 ;;
    --wheels) WHEELS=$(realpath -ms "$2"); shift 2 ;;
    --download-wheels) DOWNLOAD_WHEELS=$(realpath -ms "$2"); shift 2 ;;
    --wheel-python) WHEEL_PYTHON=$2; shift 2 ;;
    --e2e-data) E2E_DATA=$(realpath -ms "$2"); shift 2 ;;
    --e2e-budget) E2E_BUDGET_S=$2; shift 2 ;;
    *) usage ;;
  esac
done
BATCH_SIZES=${BATCH_SIZES:-"16 $LARGE_BATCH"}
START=$SECONDS
cd "$REPO"
mkdir -p "$(dirname "$OUT")"

if [ -n "$DOWNLOAD_WHEELS" ]; then
  mkdir -p "$DOWNLOAD_WHEELS"
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DOWNLOAD_WHEELS" \
    $(for dep in $WHEEL_DEPS; do echo "${dep#*=}"; done)
  "${PYTHON:-python3}" -m pip wheel -q --no-deps -w "$DOWNLOAD_WHEELS" \
    $(for dep in $SOURCE_WHEEL_DEPS; do echo "${dep#*=}"; done)
  echo "gpu_check: wheels for CPython $WHEEL_PYTHON on x86-64 Linux in $DOWNLOAD_WHEELS; on the GPU machine:" \
    "--skip-install --python python3 --wheels DIR"
  exit 0
fi
if [ -z "$PYTHON" ]; then
  PYTHON=$VENV/bin/python
fi
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
on_gpu() { "$1" -c "import jax; assert jax.default_backend() == 'gpu'" >/dev/null 2>&1; }
if [ "$INSTALL" = 1 ] && [ -x "$PYTHON" ] && on_gpu "$PYTHON"; then
  echo "gpu_check: $PYTHON's JAX runs on the GPU already; not installing"
elif [ "$INSTALL" = 1 ]; then
  cuda=$( (nvidia-smi 2>/dev/null || true) | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$cuda" ]; then
    echo "gpu_check: nvidia-smi finds no NVIDIA GPU (or driver); nothing to install for. --skip-install --allow-cpu" \
      "runs the CPU path." >&2
    exit 1
  fi
  extra=cuda12
  [ "$cuda" -ge 13 ] && extra=cuda13
  echo "gpu_check: driver supports CUDA $cuda; installing flaxtag and jax[$extra] into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e . "jax[$extra]"
fi

if [ -n "$WHEELS" ]; then
  # Only what this Python lacks, into a folder of its own: the packages it has stay as they are.
  missing=$("$PYTHON" - $WHEEL_DEPS $SOURCE_WHEEL_DEPS <<'EOF'
import importlib.util, sys

def missing(module):
  try:
    return importlib.util.find_spec(module) is None
  except ModuleNotFoundError:  # a dotted name whose parent package is missing
    return True

print(" ".join(dep.split("=", 1)[1] for dep in sys.argv[1:] if missing(dep.split("=", 1)[0])))
EOF
  )
  if [ -n "$missing" ]; then
    echo "gpu_check: installing from $WHEELS: $missing"
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$PARTS/site" $missing
    export PYTHONPATH=$PARTS/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

if ! on_gpu "$PYTHON" && [ "$ALLOW_CPU" != 1 ]; then
  echo "gpu_check: $PYTHON's JAX does not run on the GPU; see its 'pip list | grep -i jax'." >&2
  exit 1
fi

# First, where a data set is given: a run trained, stopped, resumed and evaluated with the real commands
# (benchmarks/gpu_end_to_end.py), its files in end_to_end/ beside the JSON, for --compare here afterwards.
E2E_OUT=$(dirname "$OUT")/end_to_end
if [ -n "$E2E_DATA" ]; then
  echo "gpu_check: end to end on $E2E_DATA (at most ${E2E_BUDGET_S}s)"
  rc=0
  timeout "$E2E_BUDGET_S" "$PYTHON" benchmarks/gpu_end_to_end.py --data_dir "$E2E_DATA" --out "$E2E_OUT" \
    --timeout "$E2E_BUDGET_S" > "$PARTS/end_to_end.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    { echo "exit status $rc (124: past ${E2E_BUDGET_S}s); its log's last lines:"; tail -n 30 "$PARTS/end_to_end.log"
    } > "$PARTS/end_to_end.failed"
  fi
  tail -n 3 "$PARTS/end_to_end.log"
fi

# Most important first: every mode and precision at batch 16 (fp32 first, as on the CPU), then at the large batch,
# bf16 first there: it is the throughput figure users of a GPU train with.
precisions="fp32 bf16"
for batch in $BATCH_SIZES; do
  for precision in $precisions; do
    for mode in train infer; do
      name=$mode-$precision-$batch
      left=$((BUDGET_S - (SECONDS - START)))
      if [ "$left" -lt 30 ]; then
        echo "out of time budget (${BUDGET_S}s)" > "$PARTS/$name.skipped"
        continue
      fi
      script=benchmarks/train_throughput.py
      [ "$mode" = infer ] && script=benchmarks/inference_throughput.py
      flags=(--batch_size "$batch" --steps "$STEPS" --models "$MODELS" --json "$PARTS/$name.json")
      [ "$precision" = bf16 ] && flags+=(--half_precision)
      echo "gpu_check: $name (${left}s of the budget left)"
      # A run that runs out of time keeps the models it finished: the JSON is rewritten after each model.
      rc=0
      timeout "$left" "$PYTHON" "$script" "${flags[@]}" > "$PARTS/$name.log" 2>&1 || rc=$?
      if [ "$rc" = 124 ]; then
        { echo "stopped after ${left}s, at the end of the time budget (${BUDGET_S}s); the models it finished are" \
            "under runs"; tail -n 20 "$PARTS/$name.log"; } > "$PARTS/$name.failed"
      elif [ "$rc" != 0 ]; then
        { echo "exit status $rc; its log's last lines:"; tail -n 20 "$PARTS/$name.log"; } > "$PARTS/$name.failed"
      fi
      grep -v '^{' "$PARTS/$name.log" | tail -n 8 || true
    done
  done
  precisions="bf16 fp32"
done

"$PYTHON" - "$PARTS" "$OUT" "$((SECONDS - START))" "$E2E_OUT" <<'EOF'
import glob, json, os, subprocess, sys

parts, out, wall_s, e2e_out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
  gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                        capture_output=True, text=True, check=True).stdout.strip().splitlines()
except (OSError, subprocess.CalledProcessError):
  gpus = []
runs, problems = [], {}
for path in sorted(glob.glob(os.path.join(parts, "*.json"))):
  with open(path) as f:
    runs.append(json.load(f))
for kind in ("failed", "skipped"):
  for path in sorted(glob.glob(os.path.join(parts, f"*.{kind}"))):
    with open(path) as f:
      problems.setdefault(kind, {})[os.path.basename(path).rsplit(".", 1)[0]] = f.read()
end_to_end = {}
if os.path.exists(os.path.join(e2e_out, "end_to_end.json")):
  with open(os.path.join(e2e_out, "end_to_end.json")) as f:
    end_to_end = {"end_to_end": json.load(f)}
with open(out, "w") as f:
  json.dump({"benchmark": "gpu_check", "gpus": gpus, "wall_s": wall_s, **end_to_end, "runs": runs, **problems}, f,
            indent=1)
print(f"gpu_check: {sum(len(r['results']) for r in runs)} results in {len(runs)} runs, "
      f"{len(problems.get('failed', {}))} failed, {len(problems.get('skipped', {}))} skipped, {wall_s}s -> {out}"
      + (f"; the end-to-end run's files in {e2e_out}" if end_to_end else ""))
EOF
