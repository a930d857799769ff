"""Export: graph conversion, calibration, quantization and bundle writing."""
