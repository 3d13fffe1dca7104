#!/usr/bin/env python3
"""Compiles crates/gpt2rs-cuda/src/kernels.cu, gemm_tc.cu and decode_step.cu with NVRTC, as the engine does at run time, on a
machine without a GPU: catches compile errors before a device call.

    pip install nvidia-cuda-nvrtc        # NVRTC's libraries, no GPU or driver needed
    python3 scripts/nvrtc_check.py [compute_90 compute_80 ...]

Prints NVRTC's log per architecture and exits 1 if any fails.
"""
import ctypes
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The engine compiles these as one source, in this order (device.rs's KERNELS).
SOURCES = [
    os.path.join(HERE, "..", "crates", "gpt2rs-cuda", "src", name)
    for name in ("kernels.cu", "gemm_tc.cu", "decode_step.cu")
]


def find_nvrtc():
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        for path in glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")):
            if "builtins" not in path:
                return path
    return "libnvrtc.so"


def compile_for(lib, src, arch):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip()


def main(archs):
    lib = ctypes.CDLL(find_nvrtc())
    src = b"".join(open(path, "rb").read() for path in SOURCES)
    failed = False
    for arch in archs or ["compute_90", "compute_80"]:
        ok, log = compile_for(lib, src, arch)
        print(f"{arch}: {'ok' if ok else 'FAILED'}")
        if log:
            print(log)
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
