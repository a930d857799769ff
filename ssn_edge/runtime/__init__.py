"""The edge runtime: OpenVINO, NumPy and OpenCV only. Nothing under this package may import torch."""
