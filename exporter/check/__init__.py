"""idefics-check: the accuracy regression checks of every graph and of generation against the PyTorch model."""
