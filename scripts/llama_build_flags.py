#!/usr/bin/env python3
"""Print the CMAKE_ARGS that build llama.cpp (inside llama-cpp-python) well for this machine.

- CUDA when `nvcc` is found and an NVIDIA GPU is visible (a CUDA toolkit alone, as on many
  CI images, would cost an hour of kernel compiles for nothing), Metal on Apple Silicon,
  otherwise the CPU. LOCALCHAT_BACKEND=cuda|metal|cpu forces the choice.
- On x86-64 the CPU build never uses `-march=native`: some VMs (cloud ones, and ours) report
  AMX in /proc/cpuinfo but fault on AMX instructions, so a native build dies with SIGILL on the
  first matrix multiply. We turn on each SIMD extension the CPU reports, and AMX never.
- A user's own CMAKE_ARGS always win.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

# /proc/cpuinfo flag -> ggml CMake option
X86_FEATURES = (
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)
ALWAYS = ("-DLLAVA_BUILD=OFF",)  # localchat has no image input; saves build time


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def x86_cpu_args(flags: set[str]) -> list[str]:
    """Explicit SIMD options for the CPU's features; AMX off whatever the CPU claims."""
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if feature in flags else 'OFF'}"
             for feature, option in X86_FEATURES]
    args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args


def find_nvcc() -> str | None:
    """nvcc on PATH, or under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvidia_gpu_visible() -> bool:
    """True when the NVIDIA driver reports at least one GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    if shutil.which("nvidia-smi"):
        import subprocess

        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                     timeout=20)
        except (OSError, subprocess.SubprocessError):
            return False
        return listing.returncode == 0 and "GPU" in listing.stdout
    return False


def build_args(system: str, machine: str, cpuinfo: str, nvcc: str | None,
               backend: str | None = None) -> tuple[str, list[str]]:
    """(backend name, CMake arguments) for a platform; `backend` forces cuda/metal/cpu."""
    machine = machine.lower()
    apple_silicon = system == "Darwin" and machine in ("arm64", "aarch64")
    if backend == "metal" or backend is None and apple_silicon:
        return "metal", ["-DGGML_METAL=ON", *ALWAYS]
    args = x86_cpu_args(cpu_flags(cpuinfo)) if machine in ("x86_64", "amd64") else []
    if backend == "cuda" and not nvcc:
        raise SystemExit("LOCALCHAT_BACKEND=cuda but nvcc was not found (set CUDA_HOME)")
    if nvcc and backend in (None, "cuda"):
        return "cuda", ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", *args, *ALWAYS]
    return "cpu", [*args, *ALWAYS]


def main() -> int:
    """Print `backend<TAB>cmake args` for scripts/setup."""
    if os.environ.get("CMAKE_ARGS"):
        print(f"custom\t{os.environ['CMAKE_ARGS']}")
        return 0
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    forced = os.environ.get("LOCALCHAT_BACKEND", "").lower() or None
    if forced not in (None, "cuda", "metal", "cpu"):
        raise SystemExit(f"LOCALCHAT_BACKEND must be cuda, metal or cpu (got {forced})")
    nvcc = find_nvcc() if forced == "cuda" or forced is None and nvidia_gpu_visible() else None
    backend, args = build_args(platform.system(), platform.machine(), cpuinfo, nvcc, forced)
    print(f"{backend}\t{' '.join(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
