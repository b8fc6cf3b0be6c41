"""Model families: native implementations (chatglm/, chatglm3/), the registry that tells the pipeline how
each family builds prompts and labels, which modules LoRA targets and which ids stop generation
(`instructglm.models.registry`), their registration with the Auto classes, and the one loader.

Nothing is imported here, so loading a model file does not load the registry and its chat formats.
"""
