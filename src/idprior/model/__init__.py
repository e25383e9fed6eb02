"""Models and their folders: loading, physical surgery, saved folders and their remote code, ONNX export."""
