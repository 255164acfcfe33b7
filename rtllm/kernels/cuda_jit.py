"""CUDA C++ kernels compiled at run time with NVRTC and launched through the driver API.

Triton covers almost every kernel in rtllm. A few need what Triton does not expose:
tensor-core fragments written directly by hand-written dequantization, and weight
loads kept in flight through ``cp.async`` (:mod:`rtllm.kernels.quant_gemv_mma`). Those
are written in CUDA C++ (``rtllm/kernels/cuda/*.cu``) and built here:

* **Compile**: NVRTC (``libnvrtc``, shipped with PyTorch's CUDA wheels) turns the
  source, plus ``-D`` definitions of its compile-time parameters, into a cubin for the
  device's architecture. Sources include no CUDA headers (NVRTC wheels ship none), so
  16-bit arithmetic is written as inline PTX. Cubins are cached in memory and on disk
  (``$RTLLM_CACHE_DIR`` or ``~/.cache/rtllm/cuda``), keyed by a hash of the source,
  definitions, architecture and NVRTC version.
* **Load and launch**: ``cuModuleLoadData`` into the current context (PyTorch's
  primary context) and ``cuLaunchKernelEx`` on PyTorch's current stream, optionally
  with programmatic dependent launch (:mod:`rtllm.kernels.pdl`), so launches are
  recorded by CUDA graph capture like any other kernel.

Nothing here runs on a machine without CUDA: :func:`available` says whether NVRTC and
the driver can be found, and callers fall back to their Triton kernels otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import site
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).parent / "cuda"
#: ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` and
#: ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` (cuda.h).
_ATTR_PDL = 6
_FUNC_ATTR_MAX_DYNAMIC_SMEM = 8


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: a 4-byte id, padding to 8, a 64-byte value union (here as ints:
    # a char-array field would read back as a bytes copy, not a view).
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint),
        ("grid_y", ctypes.c_uint),
        ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint),
        ("block_y", ctypes.c_uint),
        ("block_z", ctypes.c_uint),
        ("shared_mem_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


def _nvrtc_candidates() -> list[str]:
    """Where libnvrtc may be: the NVIDIA wheels beside PyTorch, then the loader's path."""
    major = (torch.version.cuda or "12").split(".")[0]
    roots = [*site.getsitepackages(), site.getusersitepackages(), str(Path(torch.__file__).parents[1])]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    found = [p for p in dict.fromkeys(found) if "alt" not in os.path.basename(p)]
    return [*found, f"libnvrtc.so.{major}", "libnvrtc.so"]


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    for name in _nvrtc_candidates():
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libnvrtc not found (it ships with PyTorch's CUDA wheels)")


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [
        ctypes.POINTER(_LaunchConfig),
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
    ]
    return lib


@functools.cache
def available() -> bool:
    """Whether CUDA kernels can be built and launched here (a CUDA device, NVRTC, the
    driver library); ``RTLLM_CUDA_KERNELS=0`` turns them off."""
    if os.environ.get("RTLLM_CUDA_KERNELS", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        _nvrtc()
        _driver()
    except OSError as err:
        logger.info("CUDA C++ kernels unavailable: %s", err)
        return False
    return True


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: CUDA error {result} ({(name.value or b'?').decode()})")


def _nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_cubin(source: str, name: str, defines: dict[str, int], arch: str) -> bytes:
    """NVRTC-compile ``source`` for ``arch`` (e.g. ``"sm_90"``) with ``-D`` ``defines``.

    Raises:
        RuntimeError: with NVRTC's log, if the source does not compile.
    """
    lib = _nvrtc()
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device"]
    opts += [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
    prog = ctypes.c_void_p()
    src = source.encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if res:
            raise RuntimeError(f"NVRTC could not compile {name} {defines}:\n{log.value.decode()}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, cubin):
            raise RuntimeError("nvrtcGetCUBIN failed")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _cache_dir() -> Path:
    return Path(os.environ.get("RTLLM_CACHE_DIR", Path.home() / ".cache" / "rtllm")) / "cuda"


@functools.cache
def _cached_cubin(file: str, defines: tuple[tuple[str, int], ...], arch: str) -> bytes:
    source = (_SOURCE_DIR / file).read_text()
    key = hashlib.sha256(repr((source, defines, arch, _nvrtc_version())).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{Path(file).stem}-{key}.cubin"
    if path.exists():
        return path.read_bytes()
    cubin = compile_cubin(source, Path(file).stem, dict(defines), arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    except OSError as err:  # a read-only home: the in-memory cache still holds it
        logger.debug("could not cache %s: %s", path, err)
    return cubin


@dataclass(eq=False)
class CudaKernel:
    """One loaded kernel function of a compiled source (:func:`load_kernel`)."""

    function: ctypes.c_void_p
    module: ctypes.c_void_p
    max_dynamic_smem: int = 48 * 1024

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        args: list[ctypes._SimpleCData],
        pdl: bool = False,
    ) -> None:
        """Launch on PyTorch's current stream. ``args`` are ctypes values in the
        kernel's parameter order (``ctypes.c_void_p(t.data_ptr())`` for tensors)."""
        self._allow_smem(shared_mem)
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        attr = _LaunchAttribute()
        attr.id = _ATTR_PDL
        attr.value[0] = 1  # programmaticStreamSerializationAllowed
        cfg = _LaunchConfig(
            *grid, *block, shared_mem, torch.cuda.current_stream().cuda_stream,
            ctypes.pointer(attr) if pdl else None, 1 if pdl else 0,
        )
        _check(_driver().cuLaunchKernelEx(ctypes.byref(cfg), self.function, params, None), "cuLaunchKernelEx")


    def _allow_smem(self, shared_mem: int) -> None:
        if shared_mem > self.max_dynamic_smem:
            _check(
                _driver().cuFuncSetAttribute(self.function, _FUNC_ATTR_MAX_DYNAMIC_SMEM, shared_mem),
                "cuFuncSetAttribute",
            )
            self.max_dynamic_smem = shared_mem

    @functools.cache  # noqa: B019 (kernels live as long as the process)
    def blocks_per_sm(self, threads: int, shared_mem: int) -> int:
        """How many CTAs of ``threads`` threads and ``shared_mem`` dynamic shared bytes
        fit on one SM at once (the driver's occupancy calculator)."""
        self._allow_smem(shared_mem)
        count = ctypes.c_int()
        _check(
            _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(count), self.function, threads, ctypes.c_size_t(shared_mem)
            ),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )
        return count.value


@functools.cache
def load_kernel(file: str, name: str, defines: tuple[tuple[str, int], ...], device_index: int) -> CudaKernel:
    """Kernel ``name`` of ``rtllm/kernels/cuda/<file>`` compiled with ``defines`` for
    device ``device_index`` (compiled and loaded once per process)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = _cached_cubin(file, defines, f"sm_{major}{minor}")
    with torch.cuda.device(device_index):
        torch.cuda.current_stream()  # makes PyTorch's primary context current
        drv = _driver()
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        _check(drv.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        _check(drv.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
    return CudaKernel(function, module)
