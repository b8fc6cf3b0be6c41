"""The native classes in transformers' Auto mappings, registered as each Auto module loads.

`import instructglm` must stay light (`instructglm --help` and `convert` never import torch), yet
after it `AutoConfig / AutoTokenizer / AutoModel / AutoModelForCausalLM .from_pretrained(dir)` must
find the native classes, without `trust_remote_code`. transformers loads its Auto modules lazily,
on first use, and each owns one mapping; so each registration runs right after its module has
loaded (at once, if it already had when `import instructglm` ran):

- `configuration_auto` → the config classes (`AutoConfig`);
- `tokenization_auto`  → the tokenizer classes (`AutoTokenizer`, by the `tokenizer_class` name);
- `modeling_auto`      → the model classes (`AutoModel`, `AutoModelForCausalLM`, ...).

`modeling_auto` is often first imported by transformers' own model code in the middle of its
import (`modeling_layers` imports `AutoModel` at its top), when importing our model file there
would meet half-initialised modules. So the model mappings first hold a `DeferredModelClass`,
which imports the real class on first use and then puts it in their place. Loading a config or a
tokenizer therefore never imports model code.

Each family adds one `Registration` to `REGISTRATIONS`; names are strings, imported only when
their mapping is filled.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType

CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
TOKENIZATION_AUTO = "transformers.models.auto.tokenization_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
# The Auto model classes a causal LM is registered with (THUDM registered all three for ChatGLM).
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM")


@dataclass(frozen=True)
class Registration:
    """One config class and what the Auto classes map it to; every class as `module:Name`."""

    model_type: str
    config: str
    tokenizer: str | None = None
    model: str | None = None
    # Set only for the class `AutoConfig` resolves `model_type` to (a family sharing a model_type
    # registers its other config classes with the tokenizer and model mappings alone).
    auto_config: bool = True
    model_auto_classes: tuple[str, ...] = field(default=MODEL_AUTO_CLASSES)


REGISTRATIONS: list[Registration] = [
    # ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B share `model_type: "chatglm"` and THUDM's tokenizer_class name
    # "ChatGLMTokenizer": AutoConfig resolves "chatglm" to ChatGLMConfig, whose `from_dict` returns a
    # ChatGLM3Config for a v2/v3 config.json, and the ChatGLMTokenizer name resolves to ChatGLM3Tokenizer for a
    # directory holding tokenizer.model; the model and tokenizer mappings then go by the config class.
    Registration(
        model_type="chatglm",
        config="instructglm.models.chatglm.config:ChatGLMConfig",
        tokenizer="instructglm.models.chatglm.tokenizer:ChatGLMTokenizer",
        model="instructglm.models.chatglm.model:ChatGLMForConditionalGeneration",
    ),
    Registration(
        model_type="chatglm",
        config="instructglm.models.chatglm3.config:ChatGLM3Config",
        tokenizer="instructglm.models.chatglm3.tokenizer:ChatGLM3Tokenizer",
        model="instructglm.models.chatglm3.model:ChatGLM3ForConditionalGeneration",
        auto_config=False,
    ),
]


def load_class(ref: str):
    """The object `module:Name` names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class DeferredModelClass:
    """Stands for a native model class in the Auto model mappings until first used.

    The Auto classes read `__module__`, `config_class`, then call `from_pretrained` or
    `_from_config`; any attribute beyond the first two imports the real class, re-registers it in
    every mapping this stood in, and is answered by it.
    """

    def __init__(self, ref: str, config_class: type, auto_classes: list[type]):
        module, _, name = ref.partition(":")
        self.__module__, self.__name__, self.__qualname__ = module, name, name
        self.config_class = config_class
        self._ref = ref
        self._auto_classes = auto_classes

    def __getattr__(self, attribute: str):
        if attribute.startswith("_") and attribute in ("_ref", "_auto_classes"):
            raise AttributeError(attribute)  # not yet set (copy / pickle of a bare instance)
        real = load_class(self._ref)
        for auto in self._auto_classes:
            auto.register(self.config_class, real, exist_ok=True)
        return getattr(real, attribute)

    def __repr__(self) -> str:
        return f"<deferred {self._ref}>"


def _register_configs(auto: ModuleType) -> None:
    for entry in REGISTRATIONS:
        if entry.auto_config:
            auto.AutoConfig.register(entry.model_type, load_class(entry.config), exist_ok=True)


def _register_tokenizers(auto: ModuleType) -> None:
    # Keyed by name, not by config class: AutoTokenizer then finds the class through tokenizer_config.json's
    # `tokenizer_class` and counts it as explicit local code, which wins over the checkpoint's `auto_map`
    # even under trust_remote_code=True (THUDM's snippets pass it). Keyed by the config class, transformers
    # would run the checkpoint's tokenization_chatglm.py instead.
    for entry in REGISTRATIONS:
        if entry.tokenizer:
            auto.AutoTokenizer.register(f"instructglm:{entry.tokenizer}", tokenizer_class=load_class(entry.tokenizer), exist_ok=True)


def _register_models(auto: ModuleType) -> None:
    for entry in REGISTRATIONS:
        if not entry.model:
            continue
        config_class = load_class(entry.config)
        auto_classes = [getattr(auto, name) for name in entry.model_auto_classes]
        deferred = DeferredModelClass(entry.model, config_class, auto_classes)
        for auto_class in auto_classes:
            auto_class.register(config_class, deferred, exist_ok=True)


AFTER_IMPORT = {
    CONFIGURATION_AUTO: _register_configs,
    TOKENIZATION_AUTO: _register_tokenizers,
    MODELING_AUTO: _register_models,
}


class _RegisteringLoader(importlib.abc.Loader):
    """The module's own loader, then the registration for it."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        AFTER_IMPORT[self._name](module)

    def __getattr__(self, attribute: str):  # get_source, is_package, ... for tools reading the module
        return getattr(self._loader, attribute)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds the Auto modules with the other finders and wraps their loaders; leaves once all are seen."""

    def __init__(self, names: set[str]):
        self.pending = set(names)
        self._lock = threading.Lock()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        with self._lock:
            self.pending.discard(fullname)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


def register() -> None:
    """Register every native class: each mapping now if its Auto module is loaded, else once it loads."""
    waiting = set()
    for name, fill in AFTER_IMPORT.items():
        module = sys.modules.get(name)
        if module is not None:
            fill(module)
        else:
            waiting.add(name)
    if waiting:
        sys.meta_path.insert(0, _AfterImportFinder(waiting))
