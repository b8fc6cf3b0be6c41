"""Training components (collator, peft set-up, callbacks) and the fine-tuning recipe."""
