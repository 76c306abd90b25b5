"""The model: the one-step graph, loading and LoRA merging, the merged-weights cache, devices and colour fixes."""
