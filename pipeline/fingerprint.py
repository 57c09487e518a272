"""Machine fingerprint: what the numbers were measured on, and which INT8 formats pay off here."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any


def _cpu_info() -> tuple[str, str, set[str]]:
    vendor, model, flags = platform.processor() or "", platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key in ("model name", "Model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return vendor, model, flags


@functools.lru_cache(maxsize=1)
def machine_fingerprint() -> dict[str, Any]:
    """CPU vendor/model, SIMD flags that matter for INT8, cores, ORT version and providers."""
    vendor, model, flags = _cpu_info()
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    return {
        "cpu_vendor": vendor,
        "cpu_model": model,
        "arch": platform.machine(),
        "flags": {
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags,
            "amx": "amx_int8" in flags,
            "arm_dotprod": "asimddp" in flags,
        },
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "ort_version": ort_version,
        # get_available_providers() lists CUDA even where no GPU exists (DESIGN.md §7): this is
        # what the package offers, not what a session runs on.
        "ort_providers": providers,
    }


def has_int8_dot_product(fingerprint: dict[str, Any]) -> bool:
    """VNNI (x86) or dot-product (ARM) instructions: U8S8 INT8 runs fast without reduce_range."""
    flags = fingerprint["flags"]
    return bool(flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx"] or flags["arm_dotprod"])
