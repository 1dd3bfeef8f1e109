"""The build step: ONNX export, the parity gate, and bundle publishing (torch)."""
