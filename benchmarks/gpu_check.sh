#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, PyTorch preinstalled and no network, install vlmcache's other
# dependencies from a wheel folder made beforehand, run the tests marked `gpu`, then measure (about 8 minutes on
# an H100) and write BENCHMARKS.md's GPU section into an output folder. docs/benchmarks.md has the one command that
# makes the wheel folder, and what each step measures.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [OUT_DIR]      # OUT_DIR defaults to $OUT
#   bash benchmarks/gpu_check.sh --dry-run [--no-wheel-check]  # every check that needs no GPU, no install
#   bash benchmarks/gpu_check.sh --install-only [--wheels DIR]   # the offline install alone, with or without a GPU
#   bash benchmarks/gpu_check.sh --rehearse-on-cpu [--wheels DIR] OUT_DIR  # every step on a CPU at toy sizes
#
# Outputs in OUT_DIR: gpu_section.md (section 6), BENCHMARKS.md (the repository's, section 6 replaced),
# gpu_bench.json (every figure), gpu_tests.txt (pytest's output), gpu_check.log (this script's own lines).
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh [--dry-run | --install-only | --rehearse-on-cpu] [--wheels DIR] [--no-wheel-check] [--images N] [OUT_DIR]"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
dry=0
install_only=0
rehearse=0
wheel_check=1
wheels="$root/wheels"
images=2048
out="${OUT:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --install-only) install_only=1 ;;
        --rehearse-on-cpu) rehearse=1 ;;
        --no-wheel-check) wheel_check=0 ;;
        --wheels) [[ $# -ge 2 ]] || { echo "error: --wheels needs a folder. $usage" >&2; exit 2; }; wheels="$2"; shift ;;
        --images) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: --images needs a positive count. $usage" >&2; exit 2; }; images="$2"; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "error: unknown option '$1'; options: --dry-run, --install-only, --rehearse-on-cpu, --wheels DIR, --no-wheel-check, --images N. $usage" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done

say() { echo "gpu_check: $*"; }
fail() { echo "gpu_check: error: $*" >&2; exit 2; }
# folders as given from where the script was called, before it moves to the repository's root
[[ "$wheels" == /* ]] || wheels="$PWD/$wheels"
[[ -z "$out" || "$out" == /* ]] || out="$PWD/$out"
cd "$root"
# the pins: the wheel folder's own list when it has one (made for what the GPU machine lacks), else every package
reqs="$here/gpu_requirements.txt"
[[ -f "$wheels/requirements.txt" ]] && reqs="$wheels/requirements.txt"

# 1. the scripts parse
bash -n "$here/gpu_check.sh" || fail "benchmarks/gpu_check.sh does not parse"
"$python" -m py_compile "$here/gpu_check.py" || fail "benchmarks/gpu_check.py does not compile"
say "scripts parse"

# 2. the wheel folder holds every pin (no torch needed)
if [[ $wheel_check == 1 ]]; then
    "$python" "$here/gpu_check.py" wheels "$wheels" --requirements "$reqs" | sed 's/^/gpu_check: /'
    [[ ${PIPESTATUS[0]} == 0 ]] || exit 2
else
    say "wheel folder not checked (--no-wheel-check)"
fi

if [[ $dry == 1 ]]; then
    # 3. the bench sections, decode modes and bench hooks that the measurement uses exist
    "$python" "$here/gpu_check.py" sections | sed 's/^/gpu_check: /'
    [[ ${PIPESTATUS[0]} == 0 ]] || exit 2
    # 4. the gpu marker selects and collects (only the files that use it are imported)
    mapfile -t files < <(grep -l 'mark\.gpu' tests/*.py || true)
    if [[ ${#files[@]} == 0 ]]; then
        say "no test is marked gpu: the run would have none to run"
    else
        collected="$("$python" -m pytest -m gpu --collect-only -q -p no:cacheprovider "${files[@]}" 2>&1)" \
            || { echo "$collected" >&2; fail "pytest -m gpu does not collect"; }
        say "tests marked gpu: $(echo "$collected" | grep -c '::') in ${files[*]}"
    fi
    # 5. where the results would go
    if [[ -n "$out" ]]; then
        mkdir -p "$out" && [[ -w "$out" ]] || fail "the output folder $out is not writable"
        say "results would go to $out"
    else
        say "no output folder given (OUT_DIR or \$OUT): a real run needs one"
    fi
    say "dry run passed (no install, no GPU used)"
    exit 0
fi

if [[ $install_only == 0 ]]; then
    [[ -n "$out" ]] || fail "no output folder: give OUT_DIR or set \$OUT. $usage"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    exec > >(tee -a "$out/gpu_check.log") 2>&1
    if [[ $rehearse == 1 ]]; then
        say "rehearsal on the CPU: the tiny model at toy sizes; its figures mean nothing"
    else
        "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
            || fail "torch sees no CUDA device here (or is not installed): this check needs both; --dry-run checks the rest"
    fi
else
    "$python" -c "import torch" || fail "$python has no torch: the install expects the machine's own"
fi
start=$SECONDS
pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
[[ "$pyver" == "3.12" ]] || say "warning: Python $pyver here; the wheel folder is made for 3.12 (docs/benchmarks.md)"

# 6. install: a venv that sees the machine's torch, the pinned wheels without deps, vlmcache itself editable
venv="$root/.gpu-venv"
pip=(python -m pip)
if ! "$python" -m venv --system-site-packages "$venv" 2>/dev/null; then
    # no ensurepip (Debian's python3 without python3-venv): a venv without pip, filled by the machine's own pip
    say "venv without ensurepip: installing with $python's pip into it"
    rm -rf "$venv"
    "$python" -m venv --system-site-packages --without-pip "$venv"
    pip=("$python" -m pip --python "$venv/bin/python")
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
"${pip[@]}" install --quiet --no-index --find-links "$wheels" --no-deps -r "$reqs"
"${pip[@]}" install --quiet --no-index --no-deps --no-build-isolation -e "$root"
"${pip[@]}" check || say "warning: pip check found the conflicts above (hdf5plugin is left out on purpose: see gpu_check.py)"
say "installed in $((SECONDS - start)) s: $(python -c 'import torch, vlmcache; print("torch", torch.__version__, "cuda", torch.version.cuda, "vlmcache", vlmcache.__version__)')"
# every module vlmcache and its tests import, from the venv: a missing wheel shows here, not in the measurements
python -c "import faiss, h5py, open_clip, pyarrow, pydantic, pytest, webdataset, vlmcache.cli, vlmcache.bench" \
    || fail "the installed packages do not import (above)"
if [[ $install_only == 1 ]]; then
    say "install only: done ($venv; activate it with: . $venv/bin/activate)"
    exit 0
fi

# 7. the tests marked gpu (exit 5: none selected), from the files that use the marker alone, as the dry run
# collects them: the other test modules need nothing a GPU adds
mapfile -t files < <(grep -l 'mark\.gpu' tests/*.py || true)
set +e
python -m pytest -m gpu -q -p no:cacheprovider "${files[@]:-tests}" >"$out/gpu_tests.txt" 2>&1
tests_rc=$?
set -e
tail -n 5 "$out/gpu_tests.txt"
case $tests_rc in
    0) if grep -qE '[0-9]+ passed' "$out/gpu_tests.txt"; then say "gpu tests passed"
       else say "gpu tests: none ran, all skipped (no CUDA device seen by pytest?): $out/gpu_tests.txt"; fi ;;
    5) say "no test is marked gpu" ;;
    *) say "gpu tests FAILED (exit $tests_rc): $out/gpu_tests.txt; measuring anyway" ;;
esac

# 8. the measurements: section 6 of BENCHMARKS.md
if [[ $rehearse == 1 ]]; then
    python "$here/gpu_check.py" bench "$out" --device cpu --model vlmcache-tiny --precision fp32 --scale smoke --images 16
else
    python "$here/gpu_check.py" bench "$out" --images "$images"
fi
say "done in $((SECONDS - start)) s; tests exit $tests_rc; section 6: $out/gpu_section.md"
[[ $tests_rc == 0 || $tests_rc == 5 ]]
