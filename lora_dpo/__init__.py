"""lora-dpo: Direct Preference Optimization with a LoRA adapter on a 4-bit base model."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns at import (which accelerate and peft trigger) that it cannot fetch an optional CPU
# kernel from the Hub and suggests `pip install kernels`; it then uses its own kernel. On an offline machine
# the advice is wrong and alarming, so only its errors are shown.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
