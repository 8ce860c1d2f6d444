"""Triton kernels for wfnet's fused weight-filtering ops (the "triton" backend).

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""
