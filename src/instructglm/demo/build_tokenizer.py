"""Build the demo's tiny tokenizer: a sentencepiece model laid out like ChatGLM-6B's `ice_text.model`.

The real `ice_text.model` (130,344 pieces) is a unigram model trained with `nmt_nfkc`
normalisation, a dummy prefix, `split_digits`, byte fallback, `<n>` as a user-defined symbol and
pad id 3; THUDM then appended GLM's special pieces after the learnt vocabulary and before the 256
byte pieces: [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> as control pieces,
<|tab|> and <|blank_2|>…<|blank_80|> as user-defined ones. This script trains the same kind of
model on the demo's sample data (a few hundred pieces) and rearranges it into that layout, so the
native `ChatGLMTokenizer` loads it unchanged and reads the special ids from it by name.

Two deliberate differences, both for size or learnability:
- Normalisation: the real model embeds sentencepiece's compiled `nmt_nfkc` table (~240 KB,
  larger than everything else here). This one embeds the same rules for every character of the
  Basic Multilingual Plane, read one character at a time from sentencepiece's own `nmt_nfkc`
  normaliser (so "，" -> "," and control characters vanish exactly as in the real one), ~35 KB.
- Numerals: `split_digits` keeps Arabic digits one piece each; Chinese numeral runs (四十七) get
  the same treatment here by dropping learnt pieces made only of 零一…九十, so every number is
  written digit by digit in both scripts and a number never seen in training is tokenized like
  the ones that were.

    python -m instructglm.demo.build_tokenizer [OUT_DIR]

Deterministic: one thread, no input sampling, the same corpus -> the same bytes.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
from pathlib import Path

from instructglm.demo import sample_data

TOKENIZER_DIR = sample_data.ASSETS_DIR / "tokenizer"
MODEL_FILE = "ice_text.model"
# Asked of the trainer: meta + byte pieces + learnt ones (the corpus supports ~330); GLM specials come on top.
TRAIN_VOCAB_SIZE = 700

CONTROL_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER_SPECIALS = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]

TOKENIZER_CONFIG = {
    "tokenizer_class": "ChatGLMTokenizer",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "num_image_tokens": 0,
}

# Pieces of two or more Chinese numeral characters, dropped after training (see above).
CHINESE_NUMERAL_RUN = re.compile("^\u2581?[零一二三四五六七八九十]{2,}$")
WORD = re.compile(r"[A-Za-z]+|[^\sA-Za-z0-9\W]+")
# ChatGLM's round prompt, which `chat` puts around a query, so its words get pieces too.
CHAT_LINES = ["[Round 0]<n>问：<n>答：", "[Round 1]<n>问：<n>答："]


def corpus_lines(seed: int = 0) -> list[str]:
    """The training text: the training split's prompts and answers (never the held-out split),
    newlines written as ChatGLM's `<n>` as its tokenizer does before sentencepiece."""
    from instructglm.data.templates import get_template

    # The demo's prompts are `convert`'s default for Alpaca records, the seed's Alpaca template.
    template = get_template("alpaca")
    train, _ = sample_data.build(seed)
    lines = list(CHAT_LINES)
    for record in train:
        lines += [template.render(record["instruction"], record["input"]).replace("\n", "<n>"), record["output"]]
    # sentencepiece seeds its candidates from substrings followed by more than one character; a
    # word always followed by the same one ("Instruction" by ":") would never become a piece.
    # Each distinct word on a line of its own gives every word a second follower (line end).
    words = {word for line in lines for word in WORD.findall(line.replace("<n>", " "))}
    return lines + sorted(words)


def nmt_nfkc_bmp_rules() -> str:
    """sentencepiece's `nmt_nfkc` rules for each BMP character, as a normalization-rule TSV."""
    import sentencepiece as spm

    normalizer = spm.SentencePieceNormalizer(
        rule_name="nmt_nfkc", add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=False
    )
    rows = []
    for code in range(1, 0x10000):
        if 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
            continue
        normalized = normalizer.normalize(chr(code))
        if normalized != chr(code):
            rows.append(f"{code:X}\t" + " ".join(f"{ord(c):X}" for c in normalized))
    return "\n".join(rows) + "\n"


def train_model(lines: list[str], vocab_size: int = TRAIN_VOCAB_SIZE) -> bytes:
    """Train the unigram model with the real model's options and return its serialized proto."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "nmt_nfkc_bmp.tsv"
        rules.write_text(nmt_nfkc_bmp_rules(), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_tsv=str(rules),
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=["<n>"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    return buffer.getvalue()


def to_chatglm_layout(serialized: bytes) -> bytes:
    """Reorder into meta pieces, learnt pieces, GLM specials, byte pieces (ChatGLM-6B's order)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    piece_type = model_pb2.ModelProto.SentencePiece
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    meta = [p for p in pieces if p[2] in (piece_type.UNKNOWN, piece_type.CONTROL, piece_type.USER_DEFINED)]
    learnt = [p for p in pieces if p[2] == piece_type.NORMAL and not CHINESE_NUMERAL_RUN.match(p[0])]
    byte_pieces = [p for p in pieces if p[2] == piece_type.BYTE]
    assert [p[0] for p in meta] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"], meta
    specials = [(name, 0.0, piece_type.CONTROL) for name in CONTROL_SPECIALS]
    specials += [(name, 0.0, piece_type.USER_DEFINED) for name in USER_SPECIALS]

    del proto.pieces[:]
    for piece, score, kind in meta + learnt + specials + byte_pieces:
        proto.pieces.add(piece=piece, score=score, type=kind)
    proto.trainer_spec.input[:] = ["instructglm demo sample data"]
    proto.trainer_spec.model_prefix = "ice_text"
    proto.normalizer_spec.name = "nmt_nfkc_bmp"
    # The rules are compiled into the model; the temporary path they were read from is noise.
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString()


def build(out_dir: Path = TOKENIZER_DIR, seed: int = 0) -> Path:
    """Write `ice_text.model` and `tokenizer_config.json` into `out_dir` and return it."""
    model = to_chatglm_layout(train_model(corpus_lines(seed)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(model)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    return out_dir


if __name__ == "__main__":
    written = build(Path(sys.argv[1]) if len(sys.argv) > 1 else TOKENIZER_DIR)
    print(f"wrote {written / MODEL_FILE} and {written / 'tokenizer_config.json'}")
