"""Model families: native implementations (chatglm/) and the registry that tells the pipeline how
each family joins prompt and target, which modules LoRA targets, and which chat template it uses."""

from instructglm.models.registry import ModelFamily, family_for, register_family

__all__ = ["ModelFamily", "family_for", "register_family"]
