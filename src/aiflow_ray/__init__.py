"""aiflow-ray: cooperative device-edge-cloud inference with speculative decoding on Ray."""

__version__ = "0.1.0"
