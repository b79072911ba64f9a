"""The compute dtype of a run: `model.dtype = "auto"` picks bf16 mixed precision where the device has fast bf16
matmuls and float32 elsewhere, because bf16 without hardware for it is slower than float32 (docs/benchmarks.md,
"Precision", has the measurements).

Fast bf16 matmuls: every TPU (its MXU), NVIDIA GPUs of compute capability 8.0 or newer (Ampere's bf16 tensor
cores), AMD Instinct GPUs from the MI200 series (gfx90a) on, and CPUs with AMX-BF16 or AVX512-BF16 units.
"""

from __future__ import annotations

import dataclasses
import functools

from models.dit import COMPUTE_DTYPES as DTYPES
from scaling.host import cpu_flags

AUTO = "auto"
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names
FIRST_FAST_BF16_NVIDIA = (8, 0)
FAST_BF16_AMD_GPU_PREFIXES = ("gfx90a", "gfx94", "gfx95")
# On a CPU, models narrower than this train faster in float32 even with bf16 units: the casts cost more than the
# small matmuls gain (docs/benchmarks.md, "Precision").
CPU_BF16_MIN_WIDTH = 128


@dataclasses.dataclass(frozen=True)
class Precision:
    """The compute dtype a run uses, what was asked for, and why that dtype."""

    dtype: str
    requested: str
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fast_bf16(platform_name: str, *, cpu_flags: frozenset[str] = frozenset(), device_kind: str = "",
              compute_capability: str | None = None) -> tuple[bool, str]:
    """Whether a device has fast bf16 matmuls, and the evidence, from what JAX and the OS say about it."""
    if platform_name == "tpu":
        return True, f"TPU ({device_kind or 'unknown kind'}): bf16 matrix units"
    if platform_name in ("gpu", "cuda", "rocm"):
        if compute_capability:
            if any(compute_capability.startswith(prefix) for prefix in FAST_BF16_AMD_GPU_PREFIXES):
                return True, f"AMD GPU {device_kind} ({compute_capability}): bf16 matrix cores"
            try:
                version = tuple(int(part) for part in compute_capability.split(".")[:2])
            except ValueError:
                version = None
            if version is not None:
                fast = version >= FIRST_FAST_BF16_NVIDIA
                first = ".".join(map(str, FIRST_FAST_BF16_NVIDIA))
                return fast, (f"GPU {device_kind} of compute capability {compute_capability} "
                              + (f"(>= {first}: bf16 tensor cores)" if fast else f"(< {first}: no bf16 tensor cores)"))
        return False, f"GPU {device_kind} of unknown bf16 support ({compute_capability or 'no compute capability'})"
    if platform_name == "cpu":
        found = sorted(set(FAST_BF16_CPU_FLAGS) & cpu_flags)
        if found:
            return True, f"CPU with bf16 units ({', '.join(found)})"
        return False, f"CPU without bf16 units (none of {', '.join(FAST_BF16_CPU_FLAGS)} in its flags)"
    return False, f"platform {platform_name!r}: bf16 support unknown"


@functools.cache
def _device_fast_bf16() -> tuple[str, bool, str]:
    import jax

    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    fast, evidence = fast_bf16(device.platform, cpu_flags=cpu_flags() if device.platform == "cpu" else frozenset(),
                               device_kind=device.device_kind,
                               compute_capability=str(capability) if capability else None)
    return device.platform, fast, evidence


def resolve(requested: str, hidden_size: int | None) -> Precision:
    """The Precision for a config's model.dtype: an explicit dtype as given; "auto" by this machine's devices and,
    on a CPU, the model's width (None: unknown, as for a plugged-in model whose arguments name no hidden_size)."""
    if requested == AUTO:
        platform_name, fast, evidence = _device_fast_bf16()
        if fast and platform_name == "cpu" and hidden_size is not None and hidden_size < CPU_BF16_MIN_WIDTH:
            return Precision("float32", AUTO, f"{evidence}, but the model is {hidden_size} wide (< "
                                              f"{CPU_BF16_MIN_WIDTH}): too narrow for bf16 to pay on a CPU")
        return Precision("bfloat16" if fast else "float32", AUTO, evidence)
    if requested not in DTYPES:
        raise ValueError(f"model.dtype must be {AUTO!r} or one of {DTYPES}, got {requested!r}.")
    return Precision(requested, requested, "set in the config")
