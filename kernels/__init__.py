"""finextract.kernels: CUDA sources, their CuPy loaders, and the CPU references that define them.

Kernels load lazily, once, on first CUDA use; every kernel has a pure torch reference and an
`impl=` switch ("auto" | "cuda" | "reference").
"""

if __name__ != "finextract.kernels":  # found as top-level `kernels` from the repository root: never shadow the real one
    from finextract.toplevel import defer_to_installed

    defer_to_installed(__name__, __path__[0])
