"""The engine: frozen backbones, image sets, prompts around an untouched ViT, training one
configuration end to end, and what it costs. Imports nothing else of vptdash."""
