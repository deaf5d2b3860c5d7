"""finextract.engine: model loading, ONNX export and the torch / onnxruntime / TensorRT backends.

Imported lazily: `import finextract.engine` pulls in no torch until a name is used.
"""

if __name__ != "finextract.engine":  # found as top-level `engine` from the repository root: never shadow the real one
    from finextract.toplevel import defer_to_installed

    defer_to_installed(__name__, __path__[0])
