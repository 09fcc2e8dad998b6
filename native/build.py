#!/usr/bin/env python3
"""Build and install the PATCHED llama-cpp-python wheel that amslocal runs on.

This file holds the project's single pin of the upstream version
(``LLAMA_CPP_PYTHON_VERSION``); nothing else in the project may pin it.

What it does (each step is skipped when its result is already cached):

1. fetch   the llama-cpp-python sdist with pip            -> <cache>/sdist/
2. extract it into native/_work/ (git-ignored)
3. patch   apply every patches/*.patch (sorted) inside <sdist>/vendor/llama.cpp
4. build   a wheel with ``pip wheel`` (CMAKE_ARGS below)   -> <cache>/wheels/<key16>/
5. install the wheel into THIS interpreter's environment (plus its runtime deps)

The cache key is a sha256 over the version, backend, final CMAKE_ARGS, the
platform / Python version (and the CPU when -march=native is on) and the bytes
of every patch file, so editing a patch triggers a rebuild and nothing else
does.  A marker next to the installed package records the key, so a second
run with nothing changed does not even reinstall.

``--stock-lib DIR`` builds the UNPATCHED libllama/libggml shared libraries
(for benchmarks: ``LLAMA_CPP_LIB_PATH=DIR``), cached the same way.

Environment:
  AMSLOCAL_BACKEND      cpu (default) | cuda | metal
  AMSLOCAL_CUDA_ARCHS   -> -DCMAKE_CUDA_ARCHITECTURES=... (cuda only)
  AMSLOCAL_CMAKE_ARGS   extra CMake flags, appended last
  AMSLOCAL_CACHE_DIR    cache root (default ~/.cache/amslocal)
  AMSLOCAL_JOBS         parallel compile jobs (default: os.cpu_count())
  AMSLOCAL_DEBUG=1      show Python tracebacks on internal errors

Standard library only; importable (``ensure_wheel``, ``install``,
``ensure_stock_lib``, ``wheel_key`` ...) as well as runnable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------
# THE pin.  Bump it here (and rebase patches/*.patch) to move to a new upstream.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# ---------------------------------------------------------------------------

DIST_NAME = "llama_cpp_python"
# Bump when the build recipe in this file changes in a way that changes the output.
RECIPE_VERSION = 1

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
PATCHES_DIR = REPO_ROOT / "patches"
WORK_DIR = HERE / "_work"

OFF_FLAGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]
BACKENDS = ("cpu", "cuda", "metal")
# Environment variables that change what the compiler produces.
_COMPILER_ENV = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CUDACXX", "CUDAHOSTCXX")
# Runtime deps of llama-cpp-python, used if the wheel metadata cannot be read.
_FALLBACK_RUNTIME_DEPS = ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]
_MARKER_NAME = ".amslocal_llama_cpp_python.json"


class BuildError(Exception):
    """A step failed; ``str(err)`` is the one line shown to the user."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


# --------------------------------------------------------------------------- helpers


def say(msg: str) -> None:
    print(f"amslocal native: {msg}", file=sys.stderr, flush=True)


def _show(path: Path) -> str:
    """Path for messages: relative to the cwd when below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (AttributeError, ValueError, OSError):  # py<3.9 / other drive
        return str(path)


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def cache_dir() -> Path:
    env = os.environ.get("AMSLOCAL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "amslocal"


def backend() -> str:
    b = os.environ.get("AMSLOCAL_BACKEND", "cpu").strip().lower() or "cpu"
    if b not in BACKENDS:
        raise BuildError(
            "config", f"AMSLOCAL_BACKEND={b!r} is not one of {', '.join(BACKENDS)}; unset it for the CPU build"
        )
    return b


def backend_flags(b: Optional[str] = None) -> List[str]:
    b = b or backend()
    if b == "cuda":
        flags = ["-DGGML_CUDA=on"]
        archs = os.environ.get("AMSLOCAL_CUDA_ARCHS", "").strip()
        if archs:
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        return flags
    if b == "metal":
        return ["-DGGML_METAL=on"]
    return []


def extra_cmake_args() -> str:
    return os.environ.get("AMSLOCAL_CMAKE_ARGS", "").strip()


# ggml's AMX weight path, which -march=native turns on for Xeons with AMX (Sapphire Rapids and
# later), segfaults in ggml_backend_amx_mul_mat on the first decode with this llama.cpp (seen on
# the project's own machines; upstream ggml-org/llama.cpp#20824, closed without a fix). An
# explicit -mno-amx-* wins over -march=native whatever the order, so the rest of the native ISA
# (AVX-512, VNNI, ...) stays; the AVX-512 kernels take over the matmuls AMX would have done.
NO_AMX_CFLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def amx_off_flags(args: str, has_amx: Optional[bool] = None) -> List[str]:
    """CMake flags that keep AMX out of a native x86 build on a CPU that has it (else none).

    Only where -march=native would enable AMX: a portable build (GGML_NATIVE=OFF) leaves AMX off
    by default, and other CPUs or compilers need no flag (older ones would not know it).
    """
    if has_amx is None:
        has_amx = _cpu_has_amx()
    if not has_amx or not _native_on(args) or sys.platform == "win32":
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX_CFLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_CFLAGS}"]


def wheel_cmake_args() -> str:
    """The final CMAKE_ARGS string handed to the wheel build (split with shlex by scikit-build-core)."""
    parts = OFF_FLAGS + backend_flags()
    extra = extra_cmake_args()
    parts += [shlex.quote(f) for f in amx_off_flags(" ".join(parts + [extra]))]
    if extra:
        parts.append(extra)
    return " ".join(parts)


def stock_cmake_args() -> List[str]:
    """CMake flags for the unpatched shared-library build (--stock-lib)."""
    rpath = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF",
    ]
    args += OFF_FLAGS + backend_flags()
    args += amx_off_flags(" ".join(args + [extra_cmake_args()]))
    if sys.platform == "darwin" and backend() == "metal":
        args.append("-DGGML_METAL_EMBED_LIBRARY=ON")  # as llama-cpp-python does on Apple
    # relocatable: libllama finds libggml* next to itself wherever DIR is
    args += ["-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", f"-DCMAKE_INSTALL_RPATH={rpath}"]
    args += shlex.split(extra_cmake_args())
    return args


def jobs() -> int:
    try:
        return max(1, int(os.environ.get("AMSLOCAL_JOBS", "")))
    except ValueError:
        return os.cpu_count() or 1


def patch_files() -> List[Path]:
    if not PATCHES_DIR.is_dir():
        return []
    return sorted(p for p in PATCHES_DIR.glob("*.patch") if p.is_file())


def patch_snapshot() -> List[Tuple[str, bytes]]:
    """(name, bytes) of every patch, read ONCE: the key, the applied patches and
    build-info.json all come from the same snapshot even if patches/ is edited
    while a build runs."""
    return [(p.name, p.read_bytes()) for p in patch_files()]


def _cpu_identity() -> str:
    """What -march=native depends on (so a shared cache never hands out a wheel
    compiled for a different CPU)."""
    ident = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "flags", "Features", "CPU implementer", "CPU part") and k not in seen:
                    seen.add(k)
                    ident.append(f"{k}={' '.join(sorted(v.split())) if k in ('flags', 'Features') else v.strip()}")
    except OSError:
        ident.append(platform.processor())
        if sys.platform == "darwin":
            try:
                ident.append(
                    subprocess.run(
                        ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                    ).stdout.strip()
                )
            except Exception:
                pass
    return "|".join(ident)


def _native_on(args: str) -> bool:
    return not re.search(r"-DGGML_NATIVE(:BOOL)?=(OFF|0|FALSE|NO)\b", args, re.I)


def _cuda_identity(args: str) -> str:
    """With no explicit CUDA arch, GGML_NATIVE compiles for the local GPU."""
    if backend() != "cuda" or "CMAKE_CUDA_ARCHITECTURES" in args or not _native_on(args):
        return ""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return ",".join(sorted(set(r.stdout.split())))
    except Exception:
        return "unknown"


def _key_material(kind: str, cmake_args: str, patches: Optional[List[Tuple[str, bytes]]]) -> List[bytes]:
    items = [
        f"kind={kind}",
        f"recipe={RECIPE_VERSION}",
        f"version={LLAMA_CPP_PYTHON_VERSION}",
        f"backend={backend()}",
        f"cmake_args={cmake_args}",
        f"platform={sysconfig.get_platform()}|{platform.machine()}|{'-'.join(platform.libc_ver())}",
        f"python={sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}{getattr(sys, 'abiflags', '')}",
    ]
    if _native_on(cmake_args):
        items.append(f"cpu={_cpu_identity()}")
    cuda = _cuda_identity(cmake_args)
    if cuda:
        items.append(f"gpu={cuda}")
    for name in _COMPILER_ENV:
        if os.environ.get(name):
            items.append(f"env.{name}={os.environ[name]}")
    out = [s.encode() for s in items]
    for name, data in patches or []:
        out.append(f"patch={name}".encode())
        out.append(data)
    return out


def _digest(chunks: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()


def wheel_key(patches: Optional[List[Tuple[str, bytes]]] = None) -> str:
    """Full sha256 cache key of the patched wheel for the current settings."""
    if patches is None:
        patches = patch_snapshot()
    return _digest(_key_material("wheel", wheel_cmake_args(), patches))


def stock_key() -> str:
    """Cache key of the unpatched shared libraries (patches deliberately excluded)."""
    return _digest(_key_material("stock-lib", " ".join(stock_cmake_args()), None))


def _run_logged(
    cmd: List[str], log: Path, *, cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None, title: str = ""
) -> int:
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        f.write(
            f"\n===== {title or cmd[0]} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
            f"$ (cd {cwd or os.getcwd()}) {shlex.join(cmd)}\n"
        )
        f.flush()
        try:
            return subprocess.run(
                cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            ).returncode
        except FileNotFoundError:
            f.write(f"command not found: {cmd[0]}\n")
            return 127


def _log_text(log: Path, tail_bytes: int = 4_000_000) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _pip(*args: str) -> List[str]:
    return [sys.executable, "-m", "pip", *args]


def _pip_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.setdefault("PIP_NO_INPUT", "1")
    return env


def _pip_hint(text: str) -> str:
    if "externally-managed-environment" in text:
        return (
            "this Python is externally managed (PEP 668); run `bash native/setup.sh` "
            "(uses .venv) or activate a virtualenv first"
        )
    if "No module named pip" in text:
        return f"pip is missing for {sys.executable}; try: {sys.executable} -m ensurepip"
    if re.search(
        r"Could not find a version|No matching distribution|NewConnectionError|"
        r"Max retries exceeded|Temporary failure in name resolution|ConnectTimeout|"
        r"SSLError|ProxyError",
        text,
    ):
        return "pip could not reach the package index; check network/proxy access to PyPI"
    if "Permission denied" in text:
        return "permission denied writing the environment; use a virtualenv (bash native/setup.sh)"
    return ""


class _Lock:
    """Exclusive lock on native/_work so two builds never run at once."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # Windows: no lock, best effort
            return self
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"waiting for another native/build.py run to finish (lock {_show(self.path)})...")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh:
            self.fh.close()


# --------------------------------------------------------------------------- steps


def sdist_path() -> Path:
    return cache_dir() / "sdist" / f"{DIST_NAME}-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


def fetch_sdist(log: Path) -> Path:
    """Step 1: the sdist, downloaded once and kept in <cache>/sdist/."""
    dest = sdist_path()
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"fetching llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (~76 MB, about a minute)...")
    tmp = dest.parent / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rc = _run_logged(
            _pip(
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                str(tmp),
            ),
            log,
            env=_pip_env(),
            title="fetch: pip download",
        )
        got = sorted(tmp.glob("*.tar.gz"))
        if rc != 0 or not got:
            hint = _pip_hint(_log_text(log)) or "check network access to PyPI"
            raise BuildError(
                "fetch",
                f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed "
                f"(log: {_show(log)}); {hint}, or put {dest.name} into {_show(dest.parent)}/",
            )
        os.replace(got[0], dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_sdist(sdist: Path, into: Path) -> Path:
    """Step 2: a fresh copy of the source tree under native/_work/."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(into, filter="data")
            else:  # Python without extraction filters (<3.10.12 / <3.11.4)
                tf.extractall(into)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BuildError("extract", f"cannot unpack {_show(sdist)} ({e}); delete it and re-run to download it again")
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise BuildError(
            "extract",
            f"{_show(sdist)} does not look like a llama-cpp-python sdist with a vendored "
            "llama.cpp; delete it and re-run",
        )
    return tops[0]


def _git_env(llama_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # Never let git discover an enclosing repository (the sdist's own .git or this
    # project's): inside one, `git apply` silently SKIPS paths outside the cwd.
    env["GIT_CEILING_DIRECTORIES"] = str(llama_dir.parent)
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    return env


def apply_patches(src: Path, log: Path, snapshot: Optional[List[Tuple[str, bytes]]] = None) -> int:
    """Step 3: git apply every patches/*.patch (sorted) inside vendor/llama.cpp."""
    if snapshot is None:
        snapshot = patch_snapshot()
    if not snapshot:
        return 0
    # apply exactly the bytes the cache key was computed from
    pdir = src.parent / "patches"
    shutil.rmtree(pdir, ignore_errors=True)
    pdir.mkdir(parents=True)
    patches = []
    for name, data in snapshot:
        (pdir / name).write_bytes(data)
        patches.append(pdir / name)
    if shutil.which("git") is None:
        raise BuildError("patch", "git not found (needed to apply patches/*.patch); try: apt-get install git")
    llama = src / "vendor" / "llama.cpp"
    gitfile = llama / ".git"  # a gitdir pointer into the sdist's .git/modules: not wanted
    if gitfile.is_file() or gitfile.is_symlink():
        gitfile.unlink()
    elif gitfile.is_dir():
        shutil.rmtree(gitfile)
    env = _git_env(llama)
    say(f"applying {len(patches)} patch{'es' if len(patches) != 1 else ''} to llama.cpp...")
    for p in patches:
        shown = f"patches/{p.name}"
        base = ["git", "apply", "--whitespace=nowarn"]
        res = subprocess.run(base + ["--numstat", str(p)], cwd=llama, env=env, capture_output=True, text=True)
        files = []
        for line in res.stdout.splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3:
                changed = not (parts[0] == "0" and parts[1] == "0")
                files.append((parts[2], changed))
        if res.returncode != 0 or not files:
            with open(log, "a") as f:
                f.write(f"\n===== patch: git apply --numstat {p}\n{res.stdout}{res.stderr}")
            raise BuildError(
                "patch",
                f"{shown} is not a valid patch (git apply --numstat failed; log: {_show(log)}); "
                "regenerate it with `git diff` inside llama.cpp",
            )
        rc = _run_logged(base + ["--check", "-v", str(p)], log, cwd=llama, env=env, title=f"patch: check {p.name}")
        if rc != 0:
            raise BuildError(
                "patch",
                f"{shown} does not apply to the llama.cpp vendored in llama-cpp-python "
                f"{LLAMA_CPP_PYTHON_VERSION} (log: {_show(log)}); rebase it onto that "
                "version (paths relative to the llama.cpp root, e.g. a/src/llama.cpp)",
            )
        before = {name: _read_or_none(llama / name) for name, _ in files}
        rc = _run_logged(base + ["-v", str(p)], log, cwd=llama, env=env, title=f"patch: apply {p.name}")
        if rc != 0:
            raise BuildError(
                "patch",
                f"git apply {shown} failed after a clean --check (log: {_show(log)}); "
                "check the patch and re-run with --force",
            )
        # verify it really changed the tree (guards against silent "Skipped patch")
        unchanged = [n for n, changed in files if changed and _read_or_none(llama / n) == before[n]]
        if unchanged:
            raise BuildError(
                "patch",
                f"{shown} reported success but did not change {unchanged[0]} "
                f"(log: {_show(log)}); is the patch relative to the llama.cpp root?",
            )
        rc = _run_logged(
            base + ["--reverse", "--check", str(p)], log, cwd=llama, env=env, title=f"patch: verify {p.name}"
        )
        if rc != 0:
            raise BuildError(
                "patch",
                f"{shown} applied but does not verify (reverse check failed; log: "
                f"{_show(log)}); does the patch change the same lines twice?",
            )
    return len(patches)


def _read_or_none(p: Path) -> Optional[bytes]:
    try:
        return p.read_bytes()
    except OSError:
        return None


def _estimate(stock: bool = False) -> str:
    n = jobs()
    if stock:  # libllama + ggml only (the wheel also builds llama-cpp-python's libllama-common)
        lo_hi = "1-3" if n <= 2 else "1-2" if n <= 4 else "about 1"
    else:
        lo_hi = "3-5" if n <= 2 else "2-3" if n <= 4 else "1-2"
    more = "; CUDA adds a lot more" if backend() == "cuda" else ""
    lo_hi = lo_hi if lo_hi.startswith("about") else f"about {lo_hi}"
    return f"{lo_hi} minutes on {n} core{'s' if n != 1 else ''}{more}"


def _build_hint(text: str) -> str:
    if re.search(
        r"No CMAKE_(CXX|C)_COMPILER could be found|is not a full path to an existing compiler|"
        r"CMAKE_(CXX|C)_COMPILER not set|C\+\+ compiler .* not able to compile",
        text,
    ):
        return "is a C++ compiler installed? try: apt-get install build-essential"
    if re.search(
        r"No CMAKE_CUDA_COMPILER|Failed to find nvcc|CUDA Toolkit not found|"
        r"Could not find nvcc|CUDAToolkit_ROOT",
        text,
    ):
        return "is the CUDA toolkit (nvcc) installed and on PATH? or use AMSLOCAL_BACKEND=cpu"
    if re.search(
        r"internal compiler error: Killed|Killed signal terminated program|"
        r"c\+\+: fatal error: Killed|out of memory allocating",
        text,
    ):
        return "the compiler ran out of memory; retry with fewer jobs, e.g. AMSLOCAL_JOBS=1"
    if re.search(
        r"CMake \S+ or higher is required|cmake: command not found|"
        r"Could not find a version that satisfies the requirement (cmake|ninja)",
        text,
    ):
        return "CMake >= 3.21 is needed; try: apt-get install cmake ninja-build"
    m = re.search(
        r"^.*?([\w./+-]+\.(?:c|cc|cpp|h|hpp|cu|cuh|m|mm)):(\d+)(?::\d+)?: (?:fatal )?error: (.{0,120})", text, re.M
    )
    if m:
        return (
            f"compile error at {m.group(1).split('vendor/llama.cpp/')[-1]}:{m.group(2)}: {m.group(3).strip()}"
            " -- if that file is patched, fix the patch"
        )
    hint = _pip_hint(text)
    if hint:
        return hint
    return "see the first 'error' in the log; is a C++ compiler installed? try: apt-get install build-essential"


def build_wheel(src: Path, log: Path, out: Path) -> Path:
    """Step 4: pip wheel with our CMAKE_ARGS."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = _pip_env()
    if env.get("CMAKE_ARGS"):
        say("note: CMAKE_ARGS from the environment is ignored; put extra flags in AMSLOCAL_CMAKE_ARGS")
    env["CMAKE_ARGS"] = wheel_cmake_args()
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs())
    for k in ("FORCE_CMAKE", "SKBUILD_CMAKE_ARGS", "SKBUILD_CMAKE_DEFINE"):
        env.pop(k, None)
    say(f"building ({_estimate()}; log: {_show(log)})...")
    rc = _run_logged(
        _pip("wheel", "-v", "--no-deps", "-w", str(out), str(src)),
        log,
        env=env,
        title=f"build: pip wheel (CMAKE_ARGS={env['CMAKE_ARGS']})",
    )
    wheels = sorted(out.glob("*.whl"))
    if rc != 0 or len(wheels) != 1:
        raise BuildError("build", f"pip wheel / cmake failed (log: {_show(log)}); {_build_hint(_log_text(log))}")
    return wheels[0]


def _cached_wheel(key: str) -> Optional[Path]:
    d = cache_dir() / "wheels" / key[:16]
    wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
    if len(wheels) != 1:
        return None
    try:
        if json.loads((d / "build-info.json").read_text()).get("key") != key:
            return None
    except (OSError, ValueError):
        return None
    return wheels[0]


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished cache entry into place."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def ensure_wheel(force: bool = False, snapshot: Optional[List[Tuple[str, bytes]]] = None) -> Path:
    """Return the cached patched wheel for the current settings, building it if needed."""
    if snapshot is None:
        snapshot = patch_snapshot()
    key = wheel_key(snapshot)
    if not force:
        hit = _cached_wheel(key)
        if hit:
            return hit
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with _Lock(WORK_DIR / ".lock"):
        if not force:
            hit = _cached_wheel(key)  # another run may have built it meanwhile
            if hit:
                return hit
        log = WORK_DIR / "build.log"
        log.write_text(
            f"amslocal native build, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, key {key}\n"
            f"python: {sys.executable}\nCMAKE_ARGS: {wheel_cmake_args()}\n"
            f"patches: {[name for name, _ in snapshot]}\n"
        )
        t0 = time.time()
        sdist = fetch_sdist(log)
        say(f"unpacking {sdist.name}...")
        src = extract_sdist(sdist, WORK_DIR / "src")
        n_patches = apply_patches(src, log, snapshot)
        if n_patches == 0:
            say("note: patches/ has no *.patch files; building STOCK llama.cpp")
        built = build_wheel(src, log, WORK_DIR / "wheel")
        wheels_root = cache_dir() / "wheels"
        wheels_root.mkdir(parents=True, exist_ok=True)
        tmp = wheels_root / f".tmp-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copy2(built, tmp / built.name)
        (tmp / "build-info.json").write_text(
            json.dumps(
                {
                    "key": key,
                    "version": LLAMA_CPP_PYTHON_VERSION,
                    "backend": backend(),
                    "cmake_args": wheel_cmake_args(),
                    "patches": {name: hashlib.sha256(data).hexdigest() for name, data in snapshot},
                    "python": sys.version.split()[0],
                    "platform": sysconfig.get_platform(),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "build_seconds": round(time.time() - t0),
                },
                indent=2,
            )
            + "\n"
        )
        final = wheels_root / key[:16]
        _publish(tmp, final)
        say(f"built wheel {key[:16]} in {_fmt_secs(time.time() - t0)}")
        return final / built.name


# --------------------------------------------------------------------------- install

_PROBE = r"""
import hashlib, json, re, sys
from importlib import metadata as md
out = {"version": None}
try:
    d = md.distribution(sys.argv[1])
except md.PackageNotFoundError:
    print(json.dumps(out)); raise SystemExit(0)
out["version"] = d.version
out["record_sha256"] = hashlib.sha256((d.read_text("RECORD") or "").encode()).hexdigest()
out["site"] = str(d.locate_file(""))
try:
    from pip._vendor.packaging.requirements import Requirement
except Exception:
    Requirement = None
reqs, unmet = [], []
for r in d.requires or []:
    if Requirement is not None:
        try:
            q = Requirement(r)
            if q.marker is not None and not q.marker.evaluate({"extra": ""}):
                continue
            reqs.append(r)
            try:
                if not q.specifier.contains(md.version(q.name), prereleases=True):
                    unmet.append(r)
            except md.PackageNotFoundError:
                unmet.append(r)
            continue
        except Exception:
            pass
    spec, _, marker = r.partition(";")
    if "extra" in marker:
        continue
    reqs.append(r)
    try:
        md.distribution(re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0))
    except Exception:
        unmet.append(r)
out["requires"], out["unmet"] = reqs, unmet
print(json.dumps(out))
"""


def _probe() -> dict:
    """What is installed in this interpreter's environment (fresh process, no caches)."""
    r = subprocess.run([sys.executable, "-c", _PROBE, DIST_NAME], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"version": None}


def _marker_path(state: dict) -> Optional[Path]:
    return Path(state["site"]) / _MARKER_NAME if state.get("site") else None


def installed_key() -> Optional[str]:
    """The build key of the llama-cpp-python installed here, if it is one of ours and untouched."""
    state = _probe()
    return _installed_key(state)


def _installed_key(state: dict) -> Optional[str]:
    if state.get("version") != LLAMA_CPP_PYTHON_VERSION:
        return None
    mp = _marker_path(state)
    try:
        marker = json.loads(mp.read_text()) if mp else {}
    except (OSError, ValueError):
        return None
    # RECORD changes whenever anyone reinstalls llama-cpp-python by other means
    if marker.get("record_sha256") != state.get("record_sha256"):
        return None
    return marker.get("key")


def _install_deps(reqs: List[str], log: Path) -> None:
    if not reqs:
        return
    rc = _run_logged(_pip("install", "-q", *reqs), log, env=_pip_env(), title="install: runtime deps")
    if rc != 0:
        raise BuildError(
            "install",
            f"installing llama-cpp-python's runtime deps ({', '.join(reqs)}) failed "
            f"(log: {_show(log)}); {_pip_hint(_log_text(log)) or 'see the log'}",
        )


def install(wheel: Path, key: str) -> None:
    """Step 5: install the wheel into sys.executable's environment and record the key."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log = WORK_DIR / "install.log"
    log.write_text(f"install {wheel} into {sys.executable}\n")
    rc = _run_logged(
        _pip("install", "--force-reinstall", "--no-deps", str(wheel)), log, env=_pip_env(), title="install: wheel"
    )
    if rc != 0:
        raise BuildError(
            "install",
            f"pip install of {wheel.name} into {sys.executable} failed (log: {_show(log)}); "
            f"{_pip_hint(_log_text(log)) or 'see the log'}",
        )
    state = _probe()
    if state.get("version") != LLAMA_CPP_PYTHON_VERSION or not state.get("site"):
        raise BuildError(
            "install",
            f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} is not visible to {sys.executable} "
            f"after installing (found {state.get('version')}; log: {_show(log)}); "
            "is another copy earlier on sys.path / PYTHONPATH?",
        )
    _install_deps(state.get("requires") or _FALLBACK_RUNTIME_DEPS, log)
    mp = _marker_path(state)
    try:
        mp.write_text(
            json.dumps(
                {
                    "key": key,
                    "record_sha256": state["record_sha256"],
                    "wheel": str(wheel),
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
                indent=2,
            )
            + "\n"
        )
    except OSError as e:
        say(f"note: could not write install marker {mp} ({e}); the next run will reinstall")


def ensure_installed(force: bool = False) -> str:
    """Build (or reuse) the patched wheel and make sure it is what this env has. Returns the key."""
    snapshot = patch_snapshot()
    key = wheel_key(snapshot)
    state = _probe()
    if not force and _installed_key(state) == key:
        if state.get("unmet"):
            _install_deps(state["unmet"], WORK_DIR / "install.log")
        say(f"patched llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({key[:16]}) already installed")
        return key
    cached = None if force else _cached_wheel(key)
    wheel = cached or ensure_wheel(force=force, snapshot=snapshot)
    install(wheel, key)
    say(f"{'cached ' if cached else ''}wheel {key[:16]} installed into {sys.prefix}")
    return key


# --------------------------------------------------------------------------- stock lib


def _lib_patterns() -> List[str]:
    if sys.platform == "darwin":
        return ["libllama*.dylib", "libggml*.dylib", "libllama*.so", "libggml*.so"]
    if sys.platform == "win32":
        return ["llama*.dll", "ggml*.dll", "libllama*.dll", "libggml*.dll"]
    return ["libllama.so*", "libggml*.so*"]


def _lib_files(d: Path) -> List[Path]:
    seen: Dict[str, Path] = {}
    for pat in _lib_patterns():
        for p in d.glob(pat):
            if p.is_file() or p.is_symlink():
                seen[p.name] = p
    return [seen[n] for n in sorted(seen)]


def _copy_libs(src_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in _lib_files(dest):  # never leave a mix of old and new libs
        old.unlink()
    for p in _lib_files(src_dir):
        target = dest / p.name
        if p.is_symlink():
            os.symlink(os.readlink(p), target)
        else:
            shutil.copy2(p, target)


def _main_lib(d: Path) -> Path:
    if sys.platform == "darwin":
        return d / "libllama.dylib"
    if sys.platform == "win32":
        return d / "llama.dll"
    return d / "libllama.so"


def _verify_stock_lib(d: Path, log: Path) -> None:
    """Load libllama from d in a fresh process; on Linux check every llama/ggml lib came from d."""
    code = (
        "import ctypes, sys, os\n"
        "ctypes.CDLL(sys.argv[1])\n"
        "if os.path.exists('/proc/self/maps'):\n"
        "    libs = {l.split()[-1] for l in open('/proc/self/maps') if ('libllama' in l or 'libggml' in l)}\n"
        "    bad = [p for p in libs if os.path.dirname(os.path.realpath(p)) != os.path.realpath(sys.argv[2])]\n"
        "    if bad: raise SystemExit('loaded from elsewhere: ' + ', '.join(sorted(bad)))\n"
    )
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    r = subprocess.run([sys.executable, "-c", code, str(_main_lib(d)), str(d)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        with open(log, "a") as f:
            f.write(f"\n===== stock-lib: load check\n{r.stdout}{r.stderr}")
        msg = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        raise BuildError("stock-lib", f"the built library in {_show(d)} does not load ({msg}; log: {_show(log)})")


def ensure_stock_lib(dest: Path, force: bool = False) -> Path:
    """Build (or reuse) the UNPATCHED libllama + libggml* and copy them into dest."""
    dest = Path(dest).expanduser().resolve()
    key = stock_key()
    root = cache_dir() / "stock-lib"
    cached = root / key[:16]
    ok = (cached / "build-info.json").is_file() and _main_lib(cached).exists()
    if force or not ok:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        with _Lock(WORK_DIR / ".lock"):
            ok = (cached / "build-info.json").is_file() and _main_lib(cached).exists()
            if force or not ok:
                _build_stock_lib(key, root, cached)
    else:
        say(f"using cached stock library {key[:16]}")
    _copy_libs(cached, dest)
    _verify_stock_lib(dest, WORK_DIR / "stock-lib.log")
    say(f"stock (unpatched) llama.cpp libraries in {_show(dest)}  (use LLAMA_CPP_LIB_PATH={dest})")
    return dest


def _build_stock_lib(key: str, root: Path, final: Path) -> None:
    log = WORK_DIR / "stock-lib.log"
    args = stock_cmake_args()
    log.write_text(
        f"amslocal stock-lib build, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, key {key}\n"
        f"cmake args: {shlex.join(args)}\n"
    )
    if shutil.which("cmake") is None:
        raise BuildError("stock-lib", "cmake not found; try: apt-get install cmake ninja-build")
    t0 = time.time()
    sdist = fetch_sdist(log)
    say(f"unpacking {sdist.name} (unpatched)...")
    src = extract_sdist(sdist, WORK_DIR / "stock-src")
    llama = src / "vendor" / "llama.cpp"
    build = WORK_DIR / "stock-build"
    shutil.rmtree(build, ignore_errors=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    say(f"building the stock llama.cpp library ({_estimate(stock=True)}; log: {_show(log)})...")
    rc = _run_logged(["cmake", "-S", str(llama), "-B", str(build), *gen, *args], log, title="stock-lib: configure")
    if rc != 0:
        raise BuildError("stock-lib", f"cmake configure failed (log: {_show(log)}); {_build_hint(_log_text(log))}")
    rc = _run_logged(
        [
            "cmake",
            "--build",
            str(build),
            "--config",
            "Release",
            "--target",
            "llama",
            "--parallel",
            str(jobs()),
            "--verbose",
        ],
        log,
        title="stock-lib: build",
    )
    if rc != 0:
        raise BuildError("stock-lib", f"cmake build failed (log: {_show(log)}); {_build_hint(_log_text(log))}")
    candidates = [build / "bin", build / "bin" / "Release", build / "src", build / "ggml" / "src"]
    libdir = next((d for d in candidates if _main_lib(d).exists()), None)
    if libdir is None:
        raise BuildError(
            "stock-lib",
            f"build finished but {_main_lib(Path('.')).name} was not found under {_show(build)} (log: {_show(log)})",
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_libs(libdir, tmp)
    if libdir != build / "bin":  # ggml libs may sit elsewhere on some generators
        for extra in (build / "bin", build / "ggml" / "src"):
            if extra.is_dir():
                for p in _lib_files(extra):
                    if not (tmp / p.name).exists():
                        shutil.copy2(p, tmp / p.name, follow_symlinks=False)
    (tmp / "build-info.json").write_text(
        json.dumps(
            {
                "key": key,
                "kind": "stock-lib",
                "version": LLAMA_CPP_PYTHON_VERSION,
                "backend": backend(),
                "cmake_args": args,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.time() - t0),
            },
            indent=2,
        )
        + "\n"
    )
    _publish(tmp, final)
    say(f"built stock library {key[:16]} in {_fmt_secs(time.time() - t0)}")


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="native/build.py",
        description=f"Build + install the patched llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
        "into this Python environment (cached).",
    )
    ap.add_argument("--force", action="store_true", help="rebuild and reinstall even if cached")
    ap.add_argument(
        "--print-key", action="store_true", help="print the 16-char cache key for the current settings and exit"
    )
    ap.add_argument(
        "--wheel-only", action="store_true", help="build/reuse the wheel and print its path; do not install"
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if this environment already has the patched build for the current "
        "settings/patches, 1 if not; builds nothing",
    )
    ap.add_argument(
        "--stock-lib",
        metavar="DIR",
        help="build the UNPATCHED libllama/libggml shared libs into DIR (for LLAMA_CPP_LIB_PATH)",
    )
    args = ap.parse_args(argv)
    try:
        if args.print_key:
            print((stock_key() if args.stock_lib else wheel_key())[:16])
            return 0
        if args.check:
            key, have = wheel_key(), installed_key()
            if have == key:
                return 0
            say(
                f"this environment is not on build {key[:16]} (installed: "
                f"{have[:16] if have else 'none/other'}); run: {sys.executable} native/build.py"
            )
            return 1
        if args.stock_lib:
            ensure_stock_lib(Path(args.stock_lib), force=args.force)
            return 0
        if args.wheel_only:
            print(ensure_wheel(force=args.force))
            return 0
        ensure_installed(force=args.force)
        return 0
    except BuildError as e:
        say(f"FAILED at {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except OSError as e:
        if os.environ.get("AMSLOCAL_DEBUG"):
            raise
        say(
            f"FAILED: {e.strerror or e}: {e.filename or ''} -- check free disk space and permissions "
            f"(cache: {cache_dir()}, work: {_show(WORK_DIR)}; AMSLOCAL_CACHE_DIR moves the cache)"
        )
        return 1
    except Exception as e:  # keep it to one line unless debugging
        if os.environ.get("AMSLOCAL_DEBUG"):
            raise
        say(f"FAILED: internal error {type(e).__name__}: {e} (re-run with AMSLOCAL_DEBUG=1 for a traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
