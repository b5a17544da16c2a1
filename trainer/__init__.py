"""The bundled trainer: shipped to the nodes and run by torchrun (python -m trainer.train)."""
