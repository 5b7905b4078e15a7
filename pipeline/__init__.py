"""bitdeploy: fine-tune BiT classifiers and deploy them to TensorRT, OpenVINO, ONNX Runtime and LiteRT."""

__version__ = "0.1.0"
