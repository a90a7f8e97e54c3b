"""Deploy: what leaves the process: ONNX (fp32 / int8), latency checks, saved models, the viewer pages."""
