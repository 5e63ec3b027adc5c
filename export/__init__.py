"""Export of the cascade's networks to ONNX and TensorRT."""
