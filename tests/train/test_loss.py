"""Labelled-only, chunked cross entropy: the plain full-logits loss and gradients, without the full logits.

The reference is transformers' own causal-LM loss (`ForCausalLMLoss` over the full logits, which is
what `model(**batch).loss` computes). Gradients are compared for the hidden states, the head weight
and LoRA weights (initialised non-zero, so every LoRA gradient is non-trivial), in float32.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from instructglm.errors import BadValue
from instructglm.train.collator import IGNORE_INDEX, CausalLMCollator
from instructglm.train.loss import chunked_cross_entropy, labelled_cross_entropy, labelled_only_loss
from instructglm.train.packing import PackedCollator

VOCAB, WIDTH = 50, 16


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, hidden):
        return self.lm_head(hidden)


def heads():
    """A plain head and a LoRA-wrapped one whose base weight also trains."""
    torch.manual_seed(0)
    plain = Head().lm_head
    lora = get_peft_model(Head(), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    lora_head = lora.base_model.model.lm_head
    lora_head.base_layer.weight.requires_grad_(True)
    return {"linear": plain, "lora": lora_head}


def hidden_and_labels(seed=1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, WIDTH, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 11), generator=generator)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    labels[2, ::3] = IGNORE_INDEX  # scattered
    return hidden, labels


def gradients(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", ["linear", "lora"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_loss_and_gradients_equal_full_logits(kind, chunk_size):
    head = heads()[kind]
    hidden, labels = hidden_and_labels()
    trained = [hidden] + [p for p in head.parameters() if p.requires_grad]
    assert len(trained) == (2 if kind == "linear" else 4)
    reference = ForCausalLMLoss(head(hidden), labels, vocab_size=VOCAB)
    ours = labelled_cross_entropy(hidden, labels, head, chunk_size=chunk_size)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(gradients(ours, trained), gradients(reference, trained)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_divides_the_sum_like_transformers():
    head = heads()["linear"]
    hidden, labels = hidden_and_labels()
    reference = ForCausalLMLoss(head(hidden), labels, vocab_size=VOCAB, num_items_in_batch=torch.tensor(57))
    torch.testing.assert_close(labelled_cross_entropy(hidden, labels, head, num_items_in_batch=torch.tensor(57)), reference)


def test_a_batch_without_labels_gives_zero_connected_to_the_head():
    head = heads()["lora"]
    hidden, labels = hidden_and_labels()
    loss = labelled_cross_entropy(hidden, torch.full_like(labels, IGNORE_INDEX), head)
    assert loss.item() == 0.0
    loss.backward()  # still a graph: DDP gets a (zero) gradient for every head parameter
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters() if p.requires_grad)


def largest_saved_tensor(fn) -> int:
    """The most elements of any tensor autograd saves while `fn()` builds the graph."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return max(sizes)


def test_full_logits_are_never_kept_for_backward():
    head = heads()["linear"]
    hidden, labels = hidden_and_labels()
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    plain = largest_saved_tensor(lambda: ForCausalLMLoss(head(hidden), labels, vocab_size=VOCAB))
    chunked = largest_saved_tensor(lambda: labelled_cross_entropy(hidden, labels, head, chunk_size=4))
    assert plain >= labelled * VOCAB  # the plain path keeps (at least) every labelled position's logits
    assert chunked < 4 * VOCAB  # ours keeps only the chunks' inputs; logits are recomputed per chunk
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden[0], head, labels[0], chunk_size=0)


# -- the generic model path: tiny Llama and tiny native ChatGLM-6B ----------------------------------------------------


def with_lora(model, targets):
    model.config.use_cache = False
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config).train()


def assert_same_as_full_logits(model, batch, num_items_in_batch=None):
    trained = [p for p in model.parameters() if p.requires_grad]
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    try:
        ours = labelled_only_loss(model, batch, num_items_in_batch=num_items_in_batch, chunk_size=8)
    finally:
        handle.remove()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # the model's own call got no positions; then chunks of at most 8 labelled positions each
    assert head_inputs[0][-2] == 0 and all(shape[0] <= 8 for shape in head_inputs[1:])
    assert sum(shape[0] for shape in head_inputs[1:]) == labelled
    reference = model(**batch, num_items_in_batch=num_items_in_batch).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, expected, parameter in zip(gradients(ours, trained), gradients(reference, trained), trained):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def rows_of(dataset_dir, count=4):
    import datasets

    rows = datasets.load_from_disk(str(dataset_dir))
    return [rows[i] for i in range(count)]


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_llama_with_lora_on_lm_head(tiny_llama_dir, llama_dataset, batching):
    from transformers import AutoModelForCausalLM

    model = with_lora(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32), ["q_proj", "v_proj", "lm_head"])
    rows = rows_of(llama_dataset)
    if batching == "padded":
        batch = CausalLMCollator(pad_token_id=0)(rows)
    else:
        batch = PackedCollator(pad_token_id=0)([{"rows": rows[:2]}, {"rows": rows[2:]}])
    assert_same_as_full_logits(model, batch)
    assert_same_as_full_logits(model, batch, num_items_in_batch=torch.tensor(100))


@pytest.fixture(scope="module")
def untied_chatglm_dir(tmp_path_factory):
    from tests import tiny_models
    from tests.train.conftest import TRAIN_CHATGLM

    options = dict(TRAIN_CHATGLM, tie_word_embeddings=False)
    return tiny_models.tiny_chatglm_dir(tmp_path_factory.mktemp("untied-chatglm"), seed=0, vocab_multiple=1, **options)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("targets", [["query_key_value"], ["query_key_value", "lm_head"]])
def test_chatglm_tied_and_untied_head(tiny_chatglm_dir, untied_chatglm_dir, chatglm_dataset, tied, targets):
    from transformers import AutoModelForCausalLM

    path = tiny_chatglm_dir if tied else untied_chatglm_dir
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert (base.lm_head.weight is base.transformer.word_embeddings.weight) == tied
    model = with_lora(base, targets)
    batch = CausalLMCollator(pad_token_id=base.config.pad_token_id, labelled_prompt_tail=1)(rows_of(chatglm_dataset))
    assert batch["attention_mask"].eq(0).any()
    assert_same_as_full_logits(model, batch)


def test_models_that_change_logits_after_the_head_are_refused(tiny_llama_dir, llama_dataset):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(BadValue, match="final_logit_softcapping.*train with full logits"):
        labelled_only_loss(model, CausalLMCollator(pad_token_id=0)(rows_of(llama_dataset)))
