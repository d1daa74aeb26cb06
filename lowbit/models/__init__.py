"""Importers for real pretrained checkpoints (no hub access)."""
