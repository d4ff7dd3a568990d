"""torch → ONNX export with opset checks and provenance."""
