"""The math of each method on plain tensors and modules (no Lightning import)."""
