"""lvd backbones in the formats other libraries load (transformers, timm, ONNX), and back."""
