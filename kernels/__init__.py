"""finextract.kernels: CUDA sources, their CuPy loaders, and the CPU references that define them.

Kernels load lazily, once, on first CUDA use; every kernel has a pure torch reference and an
`impl=` switch ("auto" | "cuda" | "reference").
"""
