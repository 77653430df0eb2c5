"""The names users bring from TRL (DPOConfig / TrainingArguments), LLaMA-Factory and torchtune, and the recipe key
each one is here. They are explained, not accepted: a recipe has one name per key, so two recipes that mean the
same read the same. An unknown key that is one of these is answered with the recipe key (config/load.py), and the
README's recipe-key section shows the table (FOREIGN_NAMES, in this order)."""

from __future__ import annotations

# name -> (recipe key, where the name comes from)
FOREIGN_NAMES: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", "TRL"),
    "per_device_train_batch_size": ("train.batch_size", "TRL"),
    "gradient_accumulation_steps": ("train.grad_accum", "TRL, LLaMA-Factory, torchtune"),
    "num_train_epochs": ("train.epochs", "TRL, LLaMA-Factory"),
    "eval_steps": ("train.eval_every", "TRL"),
    "save_steps": ("train.save_every", "TRL"),
    "save_total_limit": ("train.keep_last", "TRL"),
    "logging_steps": ("train.log_every", "TRL"),
    "lr_scheduler_type": ("train.scheduler", "TRL"),
    "warmup_steps": ("train.warmup_ratio", "TRL (a ratio of the steps here)"),
    "per_device_eval_batch_size": ("eval.batch_size", "TRL"),
    "precompute_ref_log_probs": ("train.precompute_reference", "TRL"),
    "gradient_checkpointing": ("model.gradient_checkpointing", "TRL"),
    "bf16": ("model.dtype", "TRL (model.dtype: bf16)"),
    "fp16": ("model.dtype", "TRL (model.dtype: fp16)"),
    "loss_type": ("loss.name", "TRL"),
    "truncation_mode": ("data.truncation", "TRL (keep_start, keep_end)"),
    "model_name_or_path": ("model.name", "TRL, LLaMA-Factory"),
    "dataset_name": ("data.train", "TRL"),
    "dataset_config": ("data.subset", "TRL"),
    "dataset_train_split": ("data.train_split", "TRL"),
    "dataset_test_split": ("data.eval", "TRL (a split name)"),
    "dataset": ("data.train", "LLaMA-Factory"),
    "columns": ("data.columns", "LLaMA-Factory's dataset_info (here in the recipe)"),
    "eval_dataset": ("data.eval", "LLaMA-Factory"),
    "val_size": ("data.eval_fraction", "LLaMA-Factory"),
    "cutoff_len": ("data.max_length", "LLaMA-Factory"),
    "max_samples": ("data.max_rows", "LLaMA-Factory"),
    "pref_beta": ("loss.beta", "LLaMA-Factory"),
    "pref_loss": ("loss.name", "LLaMA-Factory"),
    "pref_ftx": ("loss.rpo_alpha", "LLaMA-Factory"),
    "lora_rank": ("lora.r", "LLaMA-Factory, torchtune"),
    "lora_r": ("lora.r", "peft examples"),
    "lora_target": ("lora.target_modules", "LLaMA-Factory"),
    "lora_attn_modules": ("lora.target_modules", "torchtune"),
    "quantization_bit": ("model.quantization", "LLaMA-Factory (nf4: 4 bits)"),
    "load_in_4bit": ("model.quantization", "Unsloth, TRL's ModelConfig (nf4)"),
    "use_peft": ("lora", "TRL (an adapter is always trained here)"),
    "epochs": ("train.epochs", "torchtune"),
    "lr": ("train.lr", "torchtune"),
    "seed": ("train.seed", "TRL, torchtune"),
}
