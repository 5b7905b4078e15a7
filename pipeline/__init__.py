"""bitdeploy: fine-tune BiT classifiers and deploy them to TensorRT, OpenVINO and ONNX Runtime."""

__version__ = "0.1.0"
