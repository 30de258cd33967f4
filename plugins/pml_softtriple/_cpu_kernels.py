"""Fused CPU kernels for SoftTriple, built once per machine on first use.

On a CPU the three ``B x d x (C K)`` products are compute-bound and everything else is memory-bound: eager
PyTorch moves each ``(C K, B)`` array through memory once per operation, about a dozen times per step, and
runs Python between the operations. ``csrc/soft_triple_cpu.cpp`` registers ``torch.ops.graftkit_soft_triple``:
``losses``, an autograd operator whose node is written in C++, with one C++ call per pass (``loss_forward``
and ``loss_backward``, also operators of their own): the products through ATen, and one vectorised
(``at::vec``) pass each for the normalised, transposed embeddings, the centre norms, the per-class soft
assignment with the class-wise cross-entropy (forward), and the similarity gradient with the row and column
dots of both normalisations (backward), parallel with ``at::parallel_for`` (so ``torch.set_num_threads``
applies).

They are compiled with :func:`torch.utils.cpp_extension.load` for the CPU's vector instruction set
(``torch.backends.cpu.get_cpu_capability()``) the first time a SoftTriple loss runs on a CPU, and cached by
PyTorch (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that carries the
instruction set and the PyTorch version, so an upgraded PyTorch never loads a library built against another.
Without a compiler, on an unsupported instruction set, or with ``GRAFTKIT_SOFTTRIPLE_CPU_KERNELS=0`` in the
environment, the loss uses its PyTorch implementation: the same values and gradients, only slower.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["ENV_VAR", "available", "release_scratch", "use_for"]

ENV_VAR = "GRAFTKIT_SOFTTRIPLE_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("csrc") / "soft_triple_cpu.cpp"
# Compiler flags per ATen CPU capability: the same vector ISA and at::vec implementation ATen uses there.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_log = logging.getLogger(__name__)


def _wanted() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call; ``False`` on failure)."""
    if not _wanted():
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability)
    if flags is None:  # no vector unit at::vec targets: the kernels would not beat eager PyTorch
        return False
    try:
        load = _import_cpp_extension_load()
        _log.info("pml_softtriple: building the fused CPU kernels for %s (once per machine)", capability)
        load(
            name=_extension_name(capability),
            sources=[str(_SOURCE)],
            # -fopenmp: at::parallel_for runs on OpenMP (the libgomp PyTorch loaded); without it, serially.
            extra_cflags=[
                "-O3",
                "-fopenmp",
                f"-DCPU_CAPABILITY={capability}",
                f"-DCPU_CAPABILITY_{capability}",
                *flags,
            ],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, unwritable cache: fall back, say so once
        warnings.warn(
            f"pml_softtriple: could not build the fused CPU kernels ({type(error).__name__}: {error}); "
            f"using the PyTorch implementation (same results, slower). Set {ENV_VAR}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _extension_name(capability: str) -> str:
    torch_version = re.sub(r"\W", "_", torch.__version__)
    return f"graftkit_soft_triple_cpu_{capability.lower()}_torch_{torch_version}"


def _import_cpp_extension_load() -> Any:
    """``torch.utils.cpp_extension.load``, minus its import-time "No CUDA runtime is found" warning."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_log.setLevel(level)
    return load


@torch.compiler.assume_constant_result
def _available_constant() -> bool:
    """:func:`available`, which torch.compile evaluates once as a constant instead of tracing the build."""
    return available()


def use_for(tensor: torch.Tensor) -> bool:
    """Whether the fused kernels handle this similarity array (CPU, float32 or float64, kernels built)."""
    wanted = tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)
    return wanted and _available_constant()


def release_scratch() -> None:
    """Free the calling thread's backward scratch arrays (kept between calls; no-op without the kernels).

    The fused backward pass keeps one ``(C K, B)`` array per thread for the next call, whatever loss object
    ran it; the next backward pass on this thread allocates it again.
    """
    if available.cache_info().currsize and available():  # never builds the kernels just to free nothing
        torch.ops.graftkit_soft_triple.release_scratch()
