"""The layer-streamed export of the published sizes: checkpoints read tensor by tensor, graphs written
layer by layer."""
