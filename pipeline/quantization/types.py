"""INT8 type defaults from the machine fingerprint (DESIGN.md §7-8).

- x86 with VNNI (AVX512-VNNI, AVX-VNNI, AMX): activations uint8, weights int8 (U8S8), full range.
  Measured here: U8S8 QDQ 2x faster than S8S8.
- x86 without VNNI: U8S8 with reduce_range (7-bit weights), which avoids the saturation of the
  pre-VNNI u8*s8 instruction sequence (the ORT quantization guide's advice).
- ARM and others: S8S8, full range (ORT's default; dot-product instructions take signed pairs).
"""

from __future__ import annotations

from typing import Any

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def default_int8_types(machine: dict[str, Any]) -> dict[str, Any]:
    """{activation_type, weight_type, reduce_range, reason} for this machine."""
    from pipeline.fingerprint import has_int8_dot_product

    arch = str(machine.get("arch", "")).lower()
    vendor = str(machine.get("cpu_vendor", ""))
    is_x86 = arch in _X86 or vendor in ("GenuineIntel", "AuthenticAMD")
    try:
        dot = has_int8_dot_product(machine)
    except (KeyError, TypeError):
        dot = False
    if is_x86 and dot:
        return {
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "reduce_range": False,
            "reason": "x86 with VNNI: U8S8 (uint8 activations, int8 weights), full range",
        }
    if is_x86:
        return {
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "reduce_range": True,
            "reason": "x86 without VNNI: U8S8 with reduce_range (7-bit weights) to avoid saturation",
        }
    return {
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "reduce_range": False,
        "reason": f"{arch or 'unknown'} CPU: S8S8, full range",
    }
