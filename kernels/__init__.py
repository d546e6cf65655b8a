"""GPU kernels (Triton), each with a plain-torch reference. Imported only on CUDA hosts."""
