"""`python -m lora_dpo.toy`: build the toy world (data and base model) into the cache, and say where."""

from . import toy_data_files, toy_model_path

print(f"model: {toy_model_path()}")
for split, path in toy_data_files().items():
    print(f"{split}: {path}")
