"""Weight-only int4 (`wint4`): the format and its torch reference (`int4`), which weights a model
holds and where from (`spec`), AWQ/GPTQ checkpoints mapped onto the format (`checkpoint`), and
the linear layers' int4 parameters and matmul (`linear`). docs/quantization.md has the usage."""
