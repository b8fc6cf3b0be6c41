"""InstructGLM: instruction fine-tuning of GLM chat models with LoRA.

Importing the package registers the native ChatGLM-6B config, tokenizer and model with the
transformers Auto classes, so `AutoTokenizer/AutoConfig/AutoModelForCausalLM.from_pretrained(dir)`
load a THUDM `chatglm-6b` directory without `trust_remote_code`.
"""

__version__ = "0.1.0"

from instructglm.models import chatglm as _chatglm  # noqa: E402  (registration only)

_chatglm.register()
