"""Visual Prompt Tuning for timm vision transformers with PyTorch Lightning and Hydra."""
