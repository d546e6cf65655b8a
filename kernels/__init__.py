"""GPU kernels (Triton), each with a plain-torch reference. Imported only on CUDA hosts, except
`kv_copy`, which imports without Triton (its reference is the CPU path of KV transfer)."""
