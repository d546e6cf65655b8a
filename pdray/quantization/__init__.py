"""Weight quantization: the int4 format and its reference (`int4`)."""
