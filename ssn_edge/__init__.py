"""ssn-edge: train SuperSimpleNet, export it to OpenVINO (FP32/FP16/INT8) and run it torch-free on a factory PC."""

__version__ = "0.1.0"
