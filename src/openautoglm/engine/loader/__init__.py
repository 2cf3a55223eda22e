"""Checkpoint resolution, safetensors loading, dummy weights and the demo checkpoint."""
