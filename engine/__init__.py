"""finextract.engine: model loading, ONNX export and the torch / onnxruntime / TensorRT backends.

Imported lazily: `import finextract.engine` pulls in no torch until a name is used.
"""
