"""native/build.py: the CMake flags it hands to the build (no build is run here)."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

BUILD_PY = Path(__file__).resolve().parents[1] / "native" / "build.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("amslocal_native_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.platform == "win32", reason="the AMX flags are for GCC/Clang")
def test_amx_is_kept_out_of_native_builds_on_amx_cpus(build) -> None:
    flags = build.amx_off_flags("-DLLAVA_BUILD=OFF", has_amx=True)
    assert flags == [f"-DCMAKE_C_FLAGS={build.NO_AMX_CFLAGS}", f"-DCMAKE_CXX_FLAGS={build.NO_AMX_CFLAGS}"]
    assert set(build.NO_AMX_CFLAGS.split()) == {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"}
    # elsewhere nothing changes: no AMX on the CPU, or a portable build (AMX off by default there)
    assert build.amx_off_flags("-DLLAVA_BUILD=OFF", has_amx=False) == []
    assert build.amx_off_flags("-DGGML_NATIVE=OFF", has_amx=True) == []


@pytest.mark.skipif(sys.platform == "win32", reason="the AMX flags are for GCC/Clang")
def test_wheel_cmake_args_survive_scikit_build_splitting(build, monkeypatch) -> None:
    # scikit-build-core splits CMAKE_ARGS with shlex: each flag must come back whole
    monkeypatch.setattr(build, "_cpu_has_amx", lambda: True)
    monkeypatch.delenv("AMSLOCAL_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("AMSLOCAL_BACKEND", raising=False)
    args = shlex.split(build.wheel_cmake_args())
    assert f"-DCMAKE_C_FLAGS={build.NO_AMX_CFLAGS}" in args
    assert f"-DCMAKE_CXX_FLAGS={build.NO_AMX_CFLAGS}" in args
    assert "-DLLAVA_BUILD=OFF" in args
    assert f"-DCMAKE_C_FLAGS={build.NO_AMX_CFLAGS}" in build.stock_cmake_args()

    monkeypatch.setattr(build, "_cpu_has_amx", lambda: False)
    assert not any("amx" in a for a in shlex.split(build.wheel_cmake_args()))
