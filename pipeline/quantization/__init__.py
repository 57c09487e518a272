"""Helpers of the quantize stage: calibration data, INT8 type defaults, node sensitivity."""
