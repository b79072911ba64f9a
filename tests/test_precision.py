"""model.dtype "auto": bf16 exactly where the device has bf16 matrix units."""

import jax
import pytest

from scaling import precision
from scaling.host import cpu_flags

AVX2_EPYC = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = AVX2_EPYC | {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize("platform_name, kwargs, fast", [
    ("cpu", {"cpu_flags": AVX2_EPYC}, False),
    ("cpu", {"cpu_flags": SAPPHIRE_RAPIDS}, True),
    ("cpu", {"cpu_flags": ZEN4}, True),
    ("cpu", {"cpu_flags": AVX2_EPYC | {"amx_tile"}}, False),  # AMX tiles without the bf16 unit
    ("tpu", {"device_kind": "TPU v5 lite"}, True),
    ("gpu", {"device_kind": "NVIDIA H200", "compute_capability": "9.0"}, True),
    ("gpu", {"device_kind": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}, True),
    ("gpu", {"device_kind": "Tesla V100-SXM2-16GB", "compute_capability": "7.0"}, False),
    ("gpu", {"device_kind": "Tesla T4", "compute_capability": "7.5"}, False),
    ("rocm", {"device_kind": "AMD Instinct MI250X", "compute_capability": "gfx90a"}, True),
    ("rocm", {"device_kind": "AMD Instinct MI100", "compute_capability": "gfx908"}, False),
    ("gpu", {"device_kind": "some GPU"}, False),
    ("metal", {}, False),
])
def test_fast_bf16_follows_the_hardware(platform_name, kwargs, fast):
    found, reason = precision.fast_bf16(platform_name, **kwargs)
    assert found is fast and reason


def test_resolve_keeps_explicit_dtypes_and_refuses_unknown_ones():
    assert precision.resolve("bfloat16", 24) == precision.Precision("bfloat16", "bfloat16", "set in the config")
    assert precision.resolve("float32", 1152).dtype == "float32"
    with pytest.raises(ValueError, match="model.dtype must be 'auto' or one of"):
        precision.resolve("fp8", 384)


@pytest.mark.parametrize("platform_name, fast, width, dtype", [
    ("cpu", True, 384, "bfloat16"), ("cpu", True, 72, "float32"), ("cpu", False, 1152, "float32"),
    ("tpu", True, 72, "bfloat16"), ("gpu", False, 1152, "float32"),
])
def test_auto_takes_bf16_on_a_cpu_only_for_models_wide_enough(monkeypatch, platform_name, fast, width, dtype):
    monkeypatch.setattr(precision, "_device_fast_bf16", lambda: (platform_name, fast, "evidence"))
    chosen = precision.resolve("auto", width)
    assert chosen.dtype == dtype and chosen.reason.startswith("evidence")


def test_auto_on_this_machine_follows_its_cpu_flags():
    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator decides here")
    chosen = precision.resolve("auto", precision.CPU_BF16_MIN_WIDTH)
    has_units = bool(set(precision.FAST_BF16_CPU_FLAGS) & cpu_flags())
    assert chosen.requested == "auto" and chosen.dtype == ("bfloat16" if has_units else "float32")
