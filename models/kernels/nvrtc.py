"""Compile CUDA C++ at run time (NVRTC) and launch it on torch's current stream (the CUDA driver API), via ctypes.

Why our own: torch.cuda._compile_kernel wants a CUDA toolkit's headers (it raises without CUDA_HOME, which a
user's pip-installed torch does not have), and a kernel that includes no headers needs none. NVRTC comes
with every CUDA build of torch (the nvidia-cuda-nvrtc package beside it), the driver with the GPU.
Launches are plain cuLaunchKernel calls on torch's current stream, so CUDA graphs capture them; a dependent
launch (programmatic dependent launch, pdl.py) goes through cuLaunchKernelEx with its attribute.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch


log = logging.getLogger(__name__)


def _nvrtc(major: int | None = None) -> ctypes.CDLL:
    """libnvrtc of CUDA `major` (torch's by default): by its soname (torch may have loaded it), else from the nvidia
    packages on sys.path; its builtins library is loaded first, from the same folder, so NVRTC finds it."""
    major = major or int(torch.version.cuda.split(".")[0])
    try:
        return ctypes.CDLL(f"libnvrtc.so.{major}")
    except OSError:
        pass
    for root in sys.path:
        for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"libnvrtc.so.{major}*"))):
            for builtins in glob.glob(os.path.join(os.path.dirname(lib), f"libnvrtc-builtins.so.{major}*")):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(lib)
    raise OSError(f"NVRTC (libnvrtc.so.{major}) was not found")


def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA error {result}")


def compile_cubin(source: str, name: str, capability: tuple[int, int], options: tuple[str, ...] = (),
                  cuda_major: int | None = None) -> bytes:
    """The cubin of `source` (no #includes) for sm_XY, by the NVRTC of CUDA `cuda_major` (torch's by default); a
    compile error raises with NVRTC's log."""
    lib = _nvrtc(cuda_major)
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        flags = [f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode(), *(o.encode() for o in options)]
        result = lib.nvrtcCompileProgram(program, len(flags), (ctypes.c_char_p * len(flags))(*flags))
        size = ctypes.c_size_t()
        if result != 0:
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, text)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{text.value.decode(errors='replace')}")
        _check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _make_primary_context_current(driver: ctypes.CDLL, device: torch.device) -> None:
    """Make `device`'s primary context (torch's) current on this thread for the driver API calls that follow.

    A thread of its own (int4_precompile's) has no current context until a runtime call binds one, and neither
    torch.cuda.device nor torch.cuda.current_stream makes such a call when the device is already the thread's
    default: cuModuleLoadData there failed with CUDA error 201 (invalid context) on an H100 (session 35)."""
    context = ctypes.c_void_p()
    _check(driver.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if context.value:
        current = ctypes.c_int()
        _check(driver.cuCtxGetDevice(ctypes.byref(current)), "cuCtxGetDevice")
        if current.value == index:
            return
    handle = ctypes.c_int()
    _check(driver.cuDeviceGet(ctypes.byref(handle), index), "cuDeviceGet")
    _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle), "cuDevicePrimaryCtxRetain")
    _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")


class Kernel:
    """A compiled kernel of a loaded module, launched on torch's current stream."""

    def __init__(self, cubin: bytes, name: str, device: torch.device):
        self._driver = _driver()
        with torch.cuda.device(device):
            _make_primary_context_current(self._driver, device)
            self._module = ctypes.c_void_p()
            _check(self._driver.cuModuleLoadData(ctypes.byref(self._module), cubin), "cuModuleLoadData")
            self._function = ctypes.c_void_p()
            _check(self._driver.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()),
                   "cuModuleGetFunction")
        self._shared_limit = 48 * 1024

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared_mem: int = 0,
                 dependent: bool = False) -> None:
        """Launch with `args`: tensors as their data pointers, ints as 32-bit ints, floats as fp32. `dependent`: it
        may start while the kernel before it runs (its griddepcontrol.wait orders what it reads; pdl.py)."""
        if shared_mem > self._shared_limit:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(self._driver.cuFuncSetAttribute(self._function, 8, shared_mem), "cuFuncSetAttribute")
            self._shared_limit = shared_mem
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
                  else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if dependent:
            attribute = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
            attribute.value[0] = 1
            launch = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, stream,
                                   ctypes.pointer(attribute), 1)
            _check(self._driver.cuLaunchKernelEx(ctypes.byref(launch), self._function, pointers, None),
                   "cuLaunchKernelEx")
            return
        _check(self._driver.cuLaunchKernel(self._function, *grid, *block, shared_mem, stream, pointers, None),
               "cuLaunchKernel")


def device_of(t: torch.Tensor) -> torch.device:
    """The CUDA device `t` is on, with its index (a bare "cuda" means the current one): the kernel caches' key."""
    return t.device if t.device.index is not None else torch.device("cuda", torch.cuda.current_device())


def cache_folder() -> Path | None:
    """Where compiled cubins are kept: beside Triton's cache in the app's compile cache (compile_cache.configure
    points TRITON_CACHE_DIR there, so they are counted and reset with it); None when it is not configured."""
    triton_cache = os.environ.get("TRITON_CACHE_DIR")
    return Path(triton_cache).parent / "nvrtc" if triton_cache else None


def load_kernel(source: str, name: str, device: torch.device, options: tuple[str, ...] = ()) -> Kernel:
    """`name` of `source` compiled for `device`, from the cubin cache when it holds it (a later load of the app
    compiles nothing), else compiled now and stored. A cubin that does not load is compiled again."""
    capability = torch.cuda.get_device_capability(device)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    key = hashlib.sha256(repr((source, name, options, capability, major.value, minor.value)).encode()).hexdigest()
    folder = cache_folder()
    path = folder / f"{name}-{key[:24]}.cubin" if folder is not None else None
    if path is not None and path.is_file():
        try:
            return Kernel(path.read_bytes(), name, device)
        except (OSError, RuntimeError) as error:
            log.warning("the cached cubin %s did not load (%s): compiling it again", path, error)
    cubin = compile_cubin(source, name, capability, options)
    kernel = Kernel(cubin, name, device)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(cubin)
            partial.replace(path)
        except OSError as error:  # a read-only cache costs the next load a compile, nothing more
            log.warning("could not store the cubin in %s: %s", path, error)
    return kernel
