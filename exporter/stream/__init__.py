"""The layer-streamed export of the published sizes: checkpoints read tensor by tensor, graphs
written layer by layer, so that exporting idefics-9b or idefics-80b needs the memory of one layer,
not of the whole model.

  checkpoint.py  the tensor sources: a checkpoint folder (safetensors shards, .bin as a fallback) or
                 seeded random weights of a preset's shapes (written once as shards, or made on the fly)
  pieces.py      each graph as pieces (head, one layer, tail) built from transformers' own modules on
                 the meta device with one layer's weights
  writer.py      each piece traced, converted to the precision asked for, validated against its
                 PyTorch module, and appended to its graph's external data
"""
