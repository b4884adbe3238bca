"""Loads the compiled extension (cogkern._C), refusing clearly when it cannot work.

The extension is C++ compiled against one exact torch build; loading it under
another torch gives undefined symbols at best and memory corruption at worst.
So the version it was built against is checked before the shared library loads.
"""
from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild cogkern against the installed torch:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(from a cogkern checkout; or, for a development tree, scripts/dev_build.sh)"
)


def _load():
    try:
        from . import _build_config
    except ImportError as exc:  # a source tree that was never built
        raise ImportError(
            "cogkern's compiled extension is not built (no cogkern/_build_config.py next to "
            f"{__file__}). Install with `pip install .` or run scripts/dev_build.sh.\n{_REBUILD}"
        ) from exc
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"cogkern was built against torch {_build_config.TORCH_VERSION}, but torch "
            f"{torch.__version__} is installed; the compiled extension only works with the torch it "
            f"was built against.\n{_REBUILD}"
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(f"cogkern's compiled extension failed to load: {exc}\n{_REBUILD}") from exc
    return _C, _build_config


_C, _build_config = _load()


def build_info() -> dict:
    """What the installed extension was built with.

    Keys: ``torch_version`` (the torch it was compiled against), ``torch_cuda``
    (that torch's CUDA version, '' for CPU builds), ``cuda_kernels`` (whether the
    CUDA kernels are compiled in), ``cuda_version`` (nvcc's version),
    ``cuda_archs`` (compiled architectures, e.g. ``['90a-real']``),
    ``cpu_threads`` (how many threads the CPU kernels use now: torch.get_num_threads()
    unless the extension was built without torch's OpenMP, when it is 1),
    ``cuda_attention_head_dims`` and ``cuda_dtypes`` (what the CUDA attention kernels are built for).
    """
    archs = _C.cuda_archs()
    return {
        "torch_version": _C.torch_version(),
        "torch_cuda": _build_config.TORCH_CUDA,
        "cuda_kernels": bool(_C.with_cuda()),
        "cuda_version": _C.cuda_version(),
        "cuda_archs": [a for a in archs.split(",") if a],
        "cpu_threads": _C.cpu_parallel_threads(),
        "cuda_attention_head_dims": list(_C.cuda_attention_head_dims()),
        "cuda_dtypes": list(_C.cuda_dtypes()),
    }


def require_cuda_kernels(what: str, tensor: torch.Tensor) -> None:
    """A clear error for CUDA tensors when this build has no CUDA kernels (a CPU-only build)."""
    if tensor.is_cuda and not _C.with_cuda():
        raise NotImplementedError(
            f"{what}: this cogkern was built without CUDA kernels (CPU-only build), so CUDA tensors cannot be used. "
            "Rebuild with the CUDA toolkit present (COGKERN_CUDA=ON makes a missing toolkit an error), "
            "or move the tensors to the CPU."
        )


def op_argument_names(op) -> tuple[str, ...]:
    """The argument names of a torch.ops.cogkern op's schema, in order (the autograd glue binds by these)."""
    return tuple(a.name for a in op.default._schema.arguments)
