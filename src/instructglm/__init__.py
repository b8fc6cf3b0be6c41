"""InstructGLM: instruction fine-tuning of GLM chat models with LoRA.

Importing the package registers the native ChatGLM classes with the transformers Auto classes, so
`AutoTokenizer / AutoConfig / AutoModel / AutoModelForCausalLM .from_pretrained(dir)` load a THUDM
`chatglm-6b` directory without `trust_remote_code`. The import itself is light (no torch): each
registration happens when transformers loads the Auto module it belongs to (see
`instructglm.models.registration`).
"""

__version__ = "0.1.0"

from instructglm.models.registration import register as _register  # noqa: E402

_register()
