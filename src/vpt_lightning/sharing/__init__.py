"""Sharing a trained task: task checkpoints and packages, loading a task from a folder, the Hub, a ``.ckpt`` or a
run folder, model cards, ONNX export, and the checks every file someone else made passes before use (regular
files under a size cap, safe CSV, tensors against their config)."""
