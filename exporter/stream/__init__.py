"""The layer-streamed export of the published sizes: checkpoints read tensor by tensor, graphs
written layer by layer, so that exporting idefics-9b or idefics-80b needs the memory of one layer,
not of the whole model (checkpoint.py: the tensor sources, a checkpoint folder or seeded random
weights of a preset's shapes)."""
