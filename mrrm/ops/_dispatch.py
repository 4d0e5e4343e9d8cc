"""Backend choice for the ops.

Backends: `torch` (pure torch: mrrm.ops.oracle for the three ops of the method, the torch path of
mrrm.ops.linear_attention for Qwen3.5's layers), `cpu` (mrrm._C C++ kernels; torch's own CPU
attention kernels for varlen_attention), `triton` (mrrm.kernels; on CPU tensors only under
TRITON_INTERPRET=1), `cuda` (CUDA C++ in mrrm._C), `flash` (flash-attn's varlen function, plain
causal attention only, when installed), `fla` (flash-linear-attention's varlen kernels for the
linear-attention ops, CUDA, when installed). `reference` is the old name of `torch`, still accepted.

Selection, first match wins:
1. the `backend=` keyword of the call;
2. the environment variable MRRM_OPS: either one name for every op (`MRRM_OPS=torch`), or a
   comma-separated list of `op=name` pairs (`MRRM_OPS=varlen_attention=triton,listwise_ce=cpu`).
   A single name that an op does not have (e.g. `triton` for listwise_ce, whose GPU kernel is
   CUDA C++) leaves that op on `auto`;
3. `auto`: CUDA tensors -> the op's GPU kernel, CPU tensors -> the op's CPU backend; float64 on the
   GPU -> `torch` for the Triton ops (the kernels accumulate in fp32; fp64 callers want fp64), and
   `torch` where the op's GPU package (triton, flash-linear-attention) is not installed.
   MRRM_LINEAR_ATTENTION (an older variable) still sets the linear-attention ops when MRRM_OPS does not.
A backend that cannot serve a call raises a RuntimeError that says why. Every fallback rule lives
here: the backends themselves never switch to another one.

The compiled backends run as torch.library custom ops (`torch.ops.mrrm.*`, registered by each op's
module next to its public function), so torch.compile keeps them in one graph.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda", "flash", "fla")
ALIASES = {"reference": "torch"}  # old names still accepted
LINEAR_ATTENTION_ENV = "MRRM_LINEAR_ATTENTION"

# Which backends each op has, and what `auto` picks per device type.
OP_BACKENDS = {
    "varlen_attention": {"have": ("torch", "cpu", "triton", "flash"), "cpu": "cpu", "cuda": "triton"},
    "gather_value_head": {"have": ("torch", "cpu", "triton"), "cpu": "cpu", "cuda": "triton"},
    "listwise_ce": {"have": ("torch", "cpu", "cuda"), "cpu": "cpu", "cuda": "cuda"},
    # Qwen3.5's linear attention (mrrm.ops.linear_attention)
    "causal_conv1d": {"have": ("torch", "fla"), "cpu": "torch", "cuda": "fla"},
    "gated_delta_rule": {"have": ("torch", "fla"), "cpu": "torch", "cuda": "fla"},
}


@functools.lru_cache(maxsize=1)
def load_C():
    """The compiled extension, or None with the reason kept for error messages."""
    try:
        return importlib.import_module("mrrm._C")
    except ImportError as e:  # pragma: no cover - depends on the install
        load_C.error = str(e)
        return None


def C_or_raise(op: str):
    mod = load_C()
    if mod is None:
        raise RuntimeError(
            f"{op}: backend 'cpu'/'cuda' needs the compiled extension mrrm._C, which failed to import "
            f"({getattr(load_C, 'error', 'unknown error')}); reinstall with `pip install -e .` or set "
            "MRRM_OPS=torch"
        )
    return mod


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env_choice(op: str) -> str:
    raw = os.environ.get("MRRM_OPS", "").strip()
    if not raw or "=" in raw and op not in {item.partition("=")[0].strip() for item in raw.split(",")}:
        legacy = os.environ.get(LINEAR_ATTENTION_ENV, "").strip()
        if legacy and op in ("causal_conv1d", "gated_delta_rule"):
            raw = legacy
    raw = raw or "auto"
    if "=" not in raw:
        raw = ALIASES.get(raw, raw)
        if raw not in BACKENDS:
            raise ValueError(f"MRRM_OPS={raw!r}: expected one of {BACKENDS} or 'op=backend,...' pairs")
        return raw if (raw == "auto" or raw in OP_BACKENDS[op]["have"]) else "auto"
    for item in raw.split(","):
        name, _, value = item.partition("=")
        name, value = name.strip(), ALIASES.get(value.strip(), value.strip())
        if name not in OP_BACKENDS:
            raise ValueError(f"MRRM_OPS: unknown op {name!r}; ops are {tuple(OP_BACKENDS)}")
        if value not in BACKENDS:
            raise ValueError(f"MRRM_OPS: unknown backend {value!r} for {name}; expected one of {BACKENDS}")
        if name == op:
            return value
    return "auto"


def choose_backend(op: str, device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Resolve the backend for one call of `op` on tensors living on `device` (of `dtype`)."""
    spec = OP_BACKENDS[op]
    choice = ALIASES.get(backend, backend) if backend is not None else _env_choice(op)
    if choice not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {choice!r}; expected one of {BACKENDS}")
    if choice == "auto":
        choice = spec.get(device.type)
        if choice is None:
            return "torch"  # e.g. mps / meta devices: only pure torch is portable
        if choice == "triton" and device.type == "cuda" and (dtype == torch.float64 or not _triton_available()):
            return "torch"
        if choice == "fla" and not fla_available():
            return "torch"
        return choice
    if choice not in spec["have"]:
        raise RuntimeError(f"{op}: there is no {choice!r} backend for this op; it has {spec['have']}")
    if choice == "cpu" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend 'cpu' got tensors on {device}; move them to the CPU or use another backend")
    if choice == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not C_or_raise(op).has_cuda():
            raise RuntimeError(f"{op}: mrrm._C was built without CUDA sources (torch CPU build or no nvcc at "
                               "install time); rebuild with MRRM_BUILD_CUDA=1")
    if choice == "triton":
        if not _triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which is not installed")
        if dtype == torch.float64:
            raise RuntimeError(f"{op}: backend 'triton' accumulates in fp32 and takes float16, bfloat16 and float32; "
                               "use backend='torch' (or 'auto') for float64")
        if device.type == "cpu" and not triton_interpret():
            raise RuntimeError(f"{op}: backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 to run the "
                               "Triton kernels in the interpreter, or use MRRM_OPS=cpu")
    if choice == "fla" and not fla_available():
        raise RuntimeError(f"{op}: backend 'fla' needs flash-linear-attention: pip install 'mrrm[fla]' (fla-core)")
    if choice == "flash" and not flash_attn_available():
        raise RuntimeError(f"{op}: backend 'flash' needs flash-attn (`pip install mrrm[flash]`), which is not installed")
    return choice


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    try:
        import fla.modules.causal_conv1d  # noqa: F401  (optional: the fla backend of the linear-attention ops)
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # not installed, or its Triton import fails on this machine
        return False
    return True
