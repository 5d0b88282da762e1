"""The PyTorch reference: exportable graph modules over the HF weights, and the model sources they
are rebuilt from.

  sources.py    `--model` (embedded default, random presets, folders, hub ids) -> a loaded
                IdeficsForVisionText2Text; `load_reference` rebuilds an export's model from its manifest
  presets.py    model shapes by name (plain IdeficsConfig arguments) and the config variants
  tokenizer.py  the offline tokenizer and processor of the embedded default
  modules.py    the torch modules of the three graphs (vision, perceiver, decoder)

Needs torch and transformers. Only the torch backend (runtime/runners/torch.py) and the exporter
import it, never `import runtime`: a deployment without torch does not load it.
"""
