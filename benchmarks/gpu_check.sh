#!/usr/bin/env bash
# The prepared GPU check (README, "Checking a GPU"): one call on a machine with a CUDA GPU and
# no network runs what the CPU cannot: the CUDA-touching test files, the extraction benchmark
# (sized to ~3 minutes) and the heads on a synthetic 60k x 1280 store on cuda and cpu. It
# writes 8 files into OUT_DIR (which may already hold others):
#   machine.txt  cuda_tests.log  gpu_extract.json  gpu_extract.md  extract.log
#   gpu_heads.json  gpu_heads.md  heads.log
#
#   bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR: wheels of what that machine's Python lacks (installed with --no-deps into a
# folder put on PYTHONPATH); the project itself is used from this checkout. --dry-run: on the
# CPU in under a minute, tiny sizes, the CUDA tests skipped (tests/test_gpu_check.py runs it).
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out=${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR [WHEELS_DIR]}
wheels=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

site=$(mktemp -d "${TMPDIR:-/tmp}/embedtl-gpu-check.XXXXXX")
trap 'rm -rf "$site"' EXIT
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site/lib" "$wheels"/*.whl || { echo "gpu_check: installing $wheels failed" >&2; exit 1; }
fi
export PYTHONPATH="$site/lib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v embedtl >/dev/null 2>&1; then  # tests run `embedtl` as a command
  mkdir -p "$site/bin"
  printf '#!/usr/bin/env python3\nfrom embedtl.cli import main\nmain()\n' > "$site/bin/embedtl"
  chmod +x "$site/bin/embedtl"
  export PATH="$site/bin:$PATH"
fi

{
  date
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  nproc
  python3 -c "import torch, torchvision, embedtl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'tv', torchvision.__version__, 'embedtl', embedtl.__version__, 'gpu', torch.cuda.is_available())"
  python3 -m embedtl backbones
} > "$out/machine.txt" 2>&1

tests=(tests/test_gpu_path.py tests/test_extract.py tests/test_finetune.py tests/test_runtime.py tests/test_cuda_path.py)
if [ "$dry" = 1 ]; then
  # only the tests marked cuda, each skipped here: the run checks that they are collected
  python3 -m pytest -q -p no:cacheprovider -m cuda -n 2 --timeout 120 -rfEs "${tests[@]}" \
    > "$out/cuda_tests.log" 2>&1
  extract=(--images 32 --size 100x75 --repeats 1 --backbones efficientnet_lite0@random --image-size 64 --decoders pil)
  heads=(--rows 2000 --cases "fit linear")
else
  python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 120 -rfEs --tb=short "${tests[@]}" \
    > "$out/cuda_tests.log" 2>&1
  extract=(--images 6000 --repeats 2)
  heads=(--rows 60000)
fi
tests_rc=$?
python3 benchmarks/gpu_extract.py "${extract[@]}" --out "$out/gpu_extract.json" \
  > "$out/extract.log" 2>&1
extract_rc=$?
python3 benchmarks/gpu_heads.py "${heads[@]}" --out "$out/gpu_heads" > "$out/heads.log" 2>&1
heads_rc=$?

echo "gpu_check: tests rc $tests_rc, extract rc $extract_rc, heads rc $heads_rc -> $out"
tail -n 1 "$out/cuda_tests.log"
# pytest's 5 (no tests collected) is a failure too: the CUDA tests must be there
[ "$tests_rc" = 0 ] && [ "$extract_rc" = 0 ] && [ "$heads_rc" = 0 ]
