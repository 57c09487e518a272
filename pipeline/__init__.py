"""ONNX export and optimization pipeline for transformer models."""

__version__ = "0.2.0"
