"""The accuracy-vs-quantization report (torch-free)."""
