"""torch → ONNX export with opset checks and provenance."""

from normfold.exporter.export import ExportResult, export, op_histogram
from normfold.exporter.provenance import module_path, set_module_path

__all__ = ["ExportResult", "export", "module_path", "op_histogram", "set_module_path"]
