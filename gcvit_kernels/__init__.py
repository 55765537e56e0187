"""Fused kernels for GC ViT, one op per module, knowing nothing about the model.

* ``window_attention``: local and global-query window attention with the relative-position bias gathered in
  the kernel, forward and backward (Triton; custom ops ``gcvit::window_attention_fwd/bwd``).
* ``mbconv``: the Fused-MBConv block (depthwise 3x3, GELU, Squeeze-Excite, 1x1 conv, residual), forward and
  backward (Triton; custom ops ``gcvit::fused_mbconv_fwd/bwd``).
* ``cpu``: builds ``csrc/`` with ninja on first use and registers the C++ kernels as the CPU implementations
  of the same ops.

Submodules are imported on demand (``import gcvit_kernels.window_attention``) so that importing the package
does not import triton.
"""
