"""ONNX helpers shared by every stage: model files (io), the session factory and provider
placement (session), and the one parity grid (parity)."""
