"""lora-dpo: Direct Preference Optimization with a LoRA adapter on a 4-bit base model."""

__version__ = "0.1.0"
