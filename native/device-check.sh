#!/usr/bin/env bash
# The GPU check in one command: build the patched llama.cpp for this machine's GPU, check that
# attention evidence computed at the event equals the side branch on it, and time decode.
#
# Two halves, because the GPU machine has no network and no pip:
#
#   here, once (network, the cached sdist):   bash native/device-check.sh --pack
#       writes .devpack/ (about 30 MB): the vendored llama.cpp trimmed to what libllama needs
#       (no models, tests, docs, tools or other backends), llama-cpp-python's ctypes package, and
#       the pure-Python packages it and the GGUF writer need (gguf, diskcache). patches/, amslocal/
#       and tests/ travel with the repository.
#
#   there (NVIDIA GPU, nvcc, CMake, ninja, python3 with numpy, numba, click, pytest):
#       bash native/device-check.sh                 # CUDA build for the local GPU only
#       bash native/device-check.sh --cpu           # the same end to end on the CPU backend
#       bash native/device-check.sh --cpu --quick   # small models and depths (what the test suite runs)
#       bash native/device-check.sh --lib DIR       # skip the build: libllama.so is in DIR
#
#   Results: one file, $OUT/device-check.md (or --out DIR), with the raw numbers beside it as JSON.
#   Exit status: 0 when every check passed, 1 when one failed, 2 for a usage or build error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PACK=$ROOT/.devpack
say() { echo "device-check: $*" >&2; }
die() { echo "device-check: FAILED: $*" >&2; exit 2; }

backend=cuda; quick=0; lib=""; out="${OUT:-$PACK/out}"; pack=0; jobs="$(nproc 2>/dev/null || echo 4)"
while [ $# -gt 0 ]; do
    case "$1" in
        --pack) pack=1 ;;
        --cpu) backend=cpu ;;
        --quick) quick=1 ;;
        --lib) lib="${2:?--lib needs a directory}"; shift ;;
        --out) out="${2:?--out needs a directory}"; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

# --- here: the pack ---------------------------------------------------------------------------
if [ "$pack" = 1 ]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [ -x "$PY" ] || die "no $PY; run bash native/setup.sh first (the pack reuses its sdist and packages)"
    sdist="$("$PY" -c 'import sys; sys.path.insert(0, "native"); import build; print(build.sdist_path())')"
    [ -f "$sdist" ] || die "the llama-cpp-python sdist is not cached ($sdist); run bash native/setup.sh first"
    rm -rf "$PACK" && mkdir -p "$PACK/py"
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    tar -xzf "$sdist" -C "$tmp"
    src="$(echo "$tmp"/llama_cpp_python-*)"
    llama="$src/vendor/llama.cpp"
    mkdir -p "$PACK/llama.cpp/ggml/src"
    cp -r "$llama"/{CMakeLists.txt,LICENSE,cmake,include,src,vendor} "$PACK/llama.cpp/"
    cp -r "$llama"/ggml/{CMakeLists.txt,cmake,include} "$PACK/llama.cpp/ggml/"
    ( cd "$llama/ggml/src" && for f in *; do  # the CPU and CUDA backends; the others are not built
        if [ -d "$f" ]; then case "$f" in ggml-cpu|ggml-cuda) cp -r "$f" "$PACK/llama.cpp/ggml/src/" ;; esac
        else cp "$f" "$PACK/llama.cpp/ggml/src/"; fi
    done )
    cp -r "$src/llama_cpp" "$PACK/py/" && rm -rf "$PACK/py/llama_cpp/lib" "$PACK/py/llama_cpp/server"
    site="$("$PY" -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')"
    cp -r "$site/gguf" "$site/diskcache" "$PACK/py/"
    find "$PACK" -name __pycache__ -prune -exec rm -rf {} +
    say "wrote $PACK ($(du -sh "$PACK" | cut -f1)); run there: bash native/device-check.sh (carry .devpack)"
    exit 0
fi

# --- there: build -------------------------------------------------------------------------------
[ -d "$PACK/py/llama_cpp" ] || die "no $PACK; make it where there is network: bash native/device-check.sh --pack"
mkdir -p "$out"
PY="${PYTHON:-python3}"
if [ -z "$lib" ]; then
    build="$PACK/build-$backend"
    work="$PACK/src-$backend"
    rm -rf "$work" && cp -r "$PACK/llama.cpp" "$work"
    for p in "$ROOT"/patches/*.patch; do
        ( cd "$work" && patch -p1 --quiet --forward < "$p" ) || die "applying $(basename "$p") failed"
    done
    flags=(-DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
           -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
           -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release)
    if [ "$backend" = cuda ]; then
        command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || die "nvcc not found (use --cpu for the CPU backend)"
        export PATH="$PATH:/usr/local/cuda/bin"
        # the local GPU's architecture only, and the FA kernels of f16/q8_0/q4_0 K/V only: minutes, not an hour.
        # nvidia-smi names it (9.0 -> 90); CMake's "native" (3.24+) is the fallback
        arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')" || arch=""
        case "$arch" in ''|*[!0-9]*) arch=native ;; esac
        say "CUDA architecture: $arch"
        flags+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DGGML_CUDA_FA_ALL_QUANTS=OFF)
    fi
    gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
    t0=$(date +%s)
    say "configuring ($backend) ..."
    cmake -S "$work" -B "$build" "${gen[@]}" "${flags[@]}" > "$out/build.log" 2>&1 || { tail -30 "$out/build.log" >&2; die "cmake configure failed (log: $out/build.log)"; }
    say "building libllama with $jobs jobs ..."
    cmake --build "$build" --target llama -j "$jobs" >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log" >&2; die "build failed (log: $out/build.log)"; }
    echo "build_seconds=$(( $(date +%s) - t0 ))" > "$out/build.txt"
    lib="$(dirname "$(find "$build" -name 'libllama.so' -print -quit)")"
    [ -n "$lib" ] && [ -d "$lib" ] || die "libllama.so not found under $build"
    cp "$build"/bin/*.so "$lib"/ 2>/dev/null || true  # libggml*.so beside libllama.so
    say "built in $(( $(date +%s) - t0 )) s: $lib"
else
    echo "build_seconds=skipped (--lib $lib)" > "$out/build.txt"
fi

# --- there: check and measure -------------------------------------------------------------------
export LLAMA_CPP_LIB_PATH="$lib"
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$ROOT:$PACK/py${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$backend" = cuda ]; then export AMSLOCAL_N_GPU_LAYERS=-1; else export AMSLOCAL_N_GPU_LAYERS=0; fi
args=(--backend "$backend" --out "$out")
[ "$quick" = 1 ] && args+=(--quick)
"$PY" native/device_check.py "${args[@]}"
