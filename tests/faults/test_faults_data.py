"""Faults for convert and tokenize: kill -9 at seeded instants, a full disk, and fuzzed input.

- kill -9: each command runs as a user runs it (a subprocess of `instructglm ...`) over an output
  that holds an earlier result and is killed at a few seeded instants of its run. What is left at
  the output path must be the earlier result or the complete new one, no worker may outlive the
  killed parent, and no temp file may stay: convert's temp file has no name until it is complete
  (O_TMPFILE), and what a killed tokenize leaves beside its dataset is removed by the next run.
- a full disk: a 1 MiB tmpfs (needs root and `mount`; skipped with the reason otherwise). Each
  command ends with one error line naming the path and leaves the earlier output untouched.
- hypothesis: every reader and `iter_json_rows` keep or count (with a location) every row of any
  input, and never raise anything else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructglm.data.convert import render
from instructglm.data.io import iter_json_rows
from instructglm.data.readers import FORMATS, detect_format, read_rows
from instructglm.data.records import BadRow, DataError, Example
from instructglm.data.templates import TEMPLATES, get_template
from instructglm.data.tokenize import read_convert_meta
from instructglm.layout import DATA_META, jsonl_meta_path

KILL_SEED = 8  # seeds the kill instants: delays after the start, or after the phase under test began
WORDS = "hello world the quick brown fox jumps over lazy dog instruction answer add two numbers 你好 世界 a b c d e f".split()


# ---- running the commands --------------------------------------------------------------------


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "instructglm.cli", *argv]


def _run(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(_command(*argv), env=_env(), capture_output=True, text=True, timeout=600)
    return done, time.monotonic() - start


def _processes_under(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_parent_at(delay: float, *argv: str, once=None) -> list[int]:
    """Start `instructglm argv`, SIGKILL only its own pid; return the pids it had started.

    The kill comes `delay` s after the start, or after `once(pid)` first holds when given (say,
    once its temp dataset dir appears), so that seeded instants fall in the phase under test.
    """
    process = subprocess.Popen(_command(*argv), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()

    def wait(condition) -> None:
        while process.poll() is None and not condition():
            children.update(_processes_under(process.pid))
            time.sleep(0.01)

    if once is not None:
        wait(lambda: once(process.pid))
    deadline = time.monotonic() + delay
    wait(lambda: time.monotonic() >= deadline)
    children.update(_processes_under(process.pid))
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return sorted(children)


def _assert_no_survivors(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # leave nothing running whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"processes {survivors} outlived the killed command"


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _o_tmpfile_works(directory: Path) -> bool:
    if not hasattr(os, "O_TMPFILE"):
        return False
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError:
        return False
    return True


# ---- inputs ------------------------------------------------------------------------------------


def _alpaca_file(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            record = {"instruction": " ".join(rng.choices(WORDS, k=8)) + f" {i}", "input": "", "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _context_file(path: Path, rows: int, seed: int, longest_target: int = 40) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            target = " ".join(rng.choices(WORDS, k=rng.randint(1, longest_target)))
            row = {"context": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))), "target": target}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer in a tiny Llama's model dir: fast to load, so kills land in the work."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("word-llama")
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(directory)
    LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(directory)
    return directory


# ---- kill -9 -------------------------------------------------------------------------------------


def _outputs(save_path: Path) -> tuple[bytes, bytes]:
    return save_path.read_bytes(), Path(jsonl_meta_path(save_path)).read_bytes()


@pytest.mark.slow
def test_kill_convert_leaves_the_old_or_the_new_output(tmp_path):
    inputs = [_alpaca_file(tmp_path / f"in{i}.jsonl", 50_000, seed=i) for i in (0, 1)]
    save = tmp_path / "out" / "data.jsonl"
    results = []
    for i, source in enumerate(inputs):  # each input's complete result, written where the kills will write
        done, seconds = _run("convert", "--data_path", str(source), "--save_path", str(save))
        assert done.returncode == 0, done.stderr
        results.append(_outputs(save))
    rng = random.Random(KILL_SEED)

    def writing(pid: int) -> bool:  # the run holds a file open in the output dir: its (unnamed) temp file
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{save.parent}/") for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return False

    kills = [(None, rng.uniform(0.3, 1.0) * seconds), (writing, rng.uniform(0.0, 0.05)), (writing, rng.uniform(0.0, 0.3))]
    current = 1
    for once, delay in kills:
        other = 1 - current
        pids = _kill_parent_at(delay, "convert", "--data_path", str(inputs[other]), "--save_path", str(save), once=once)
        _assert_no_survivors(pids)
        jsonl, sidecar = _outputs(save)
        assert jsonl in (results[0][0], results[1][0]), f"killed at {delay:.2f}s: the jsonl is neither result"
        assert sidecar in (results[0][1], results[1][1]), f"killed at {delay:.2f}s: the sidecar is neither result"
        if (jsonl, sidecar) not in results:  # killed between the two renames: the sidecar says it is stale
            assert read_convert_meta(save) is None
        if _o_tmpfile_works(save.parent):
            assert _hidden(save.parent) == [], f"killed at {delay:.2f}s: temp files left"
        current = next(i for i, result in enumerate(results) if result[0] == jsonl)
        print(f"kill after {'writing' if once else 'start'} + {delay:.2f}s: jsonl {current}, sidecar matches: {(jsonl, sidecar) in results}")
    done, _ = _run("convert", "--data_path", str(inputs[1]), "--save_path", str(save))
    assert done.returncode == 0 and _outputs(save) == results[1] and _hidden(save.parent) == []


def _table(dataset_dir: Path):
    import datasets

    return datasets.load_from_disk(str(dataset_dir)).data.table


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", [1, 2])
def test_kill_tokenize_leaves_the_old_or_the_new_dataset_and_no_worker(tmp_path, word_model_dir, num_proc):
    # long rows, so that saving the dataset takes long enough (~0.1 s) for kills to land inside it
    inputs = [_context_file(tmp_path / f"rows{i}.jsonl", 5_000, seed=i, longest_target=600) for i in (0, 1)]
    save = tmp_path / "data" / "ds"

    def argv(source: Path) -> list[str]:
        return ["tokenize", "--jsonl_path", str(source), "--save_path", str(save), "--model_name_or_path",
                str(word_model_dir), "--max_seq_length", "512", "--num_proc", str(num_proc), "--batch_size", "1000"]

    tables, metas = [], []
    for source in inputs:
        done, seconds = _run(*argv(source))
        assert done.returncode == 0, done.stderr
        tables.append(_table(save))
        metas.append(json.loads((save / DATA_META).read_text(encoding="utf-8")))
    rng = random.Random(KILL_SEED + num_proc)
    # the run's own temp dataset dir (its name carries its pid) has appeared: save_to_disk has begun
    saving = lambda pid: any(name.startswith(f".ds.{pid}-") for name in _hidden(save.parent))  # noqa: E731
    with_workers = lambda pid: len(_processes_under(pid)) >= num_proc  # noqa: E731
    kills = [  # (what the kill waits for, then a seeded delay)
        (with_workers if num_proc > 1 else None, rng.uniform(0.0, 0.5) if num_proc > 1 else rng.uniform(0.3, 0.9) * seconds),
        (saving, rng.uniform(0.0, 0.005)),  # inside save_to_disk (tens of ms here)
        (saving, rng.uniform(0.0, 0.1)),  # inside the save, the swap or the clean-up after it
    ]
    current = 1
    for once, delay in kills:
        other = 1 - current
        pids = _kill_parent_at(delay, *argv(inputs[other]), once=once)
        if once is with_workers:
            assert len(pids) >= num_proc, f"expected {num_proc} workers, saw {pids}"
        _assert_no_survivors(pids)
        table = _table(save)  # a dataset is there and loads
        matches = [i for i, known in enumerate(tables) if table.equals(known)]
        assert matches, f"killed at {delay:.2f}s: the dataset at --save_path is neither result"
        current = matches[0]
        assert json.loads((save / DATA_META).read_text(encoding="utf-8")) == metas[current]
        leftovers = _hidden(save.parent)
        assert all(name.startswith(".ds.") and name.endswith((".tmp", ".old")) for name in leftovers), leftovers
        print(f"kill after {'workers' if once is with_workers else 'saving' if once else 'start'} + {delay:.2f}s: "
              f"result {current}, processes {pids}, left {leftovers}")
    done, _ = _run(*argv(inputs[1]))  # the next run removes what the killed ones left
    assert done.returncode == 0, done.stderr
    assert _table(save).equals(tables[1]) and _hidden(save.parent) == []


# ---- a full disk -------------------------------------------------------------------------------------


@contextmanager
def _small_tmpfs(directory: Path, size: str = "1m"):
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full-disk test mounts a small tmpfs, which needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the full-disk test needs one")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)  # lazy: datasets may still map its files


def _one_error_line(stderr: str, command: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"instructglm {command}: error: "), stderr
    return errors[0]


def test_full_disk_convert_and_tokenize_leave_the_earlier_output(tmp_path, word_model_dir):
    import datasets

    small = _alpaca_file(tmp_path / "small.jsonl", 20, seed=0)
    big = _alpaca_file(tmp_path / "big.jsonl", 20_000, seed=1)  # ~3 MB of output: more than the disk holds
    with _small_tmpfs(tmp_path / "disk") as disk:
        out = disk / "data.jsonl"
        done, _ = _run("convert", "--data_path", str(small), "--save_path", str(out))
        assert done.returncode == 0, done.stderr
        before = _outputs(out)
        done, _ = _run("convert", "--data_path", str(big), "--save_path", str(out))
        assert done.returncode == 2
        line = _one_error_line(done.stderr, "convert")
        assert "No space left on device" in line and str(out) in line
        assert _outputs(out) == before and sorted(p.name for p in disk.iterdir()) == ["data.jsonl", "data.jsonl.meta.json"]

        rows = _context_file(tmp_path / "rows.jsonl", 50_000, seed=2)
        ds = disk / "ds"
        done, _ = _run("tokenize", "--jsonl_path", str(out), "--save_path", str(ds), "--model_name_or_path", str(word_model_dir), "--max_seq_length", "64")
        assert done.returncode == 0, done.stderr
        old = _table(ds)
        done, _ = _run("tokenize", "--jsonl_path", str(rows), "--save_path", str(ds), "--model_name_or_path", str(word_model_dir), "--max_seq_length", "64")
        assert done.returncode == 2
        line = _one_error_line(done.stderr, "tokenize")
        assert "No space left on device" in line and str(ds) in line
        assert _table(ds).equals(old) and sorted(p.name for p in disk.iterdir()) == ["data.jsonl", "data.jsonl.meta.json", "ds"]
        assert len(datasets.load_from_disk(str(ds))) == 20


# ---- fuzzing the readers -----------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# any code point, lone surrogates included (what a JSON "\ud83d" escape gives)
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=12)
FIELDS = ["instruction", "input", "output", "history", "system", "target", "conversations", "conversation",
          "chosen", "rejected", "prompt", "messages", "from", "value", "role", "content", "human", "assistant"]
ROLES = ["human", "user", "gpt", "assistant", "system", "model", "function", "Human"]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
turn = st.dictionaries(st.sampled_from(["from", "value", "role", "content", "human", "assistant"]), st.sampled_from(ROLES) | any_text | json_values, max_size=4)
field_value = st.one_of(any_text, st.lists(turn, max_size=5), turn, st.lists(st.lists(any_text, max_size=3), max_size=3), json_values)
record = st.dictionaries(st.sampled_from(FIELDS) | any_text, field_value, max_size=7)


def _check_example(example: Example) -> None:
    for name in TEMPLATES:  # every kept example renders and writes as UTF-8 under every template
        json.dumps(render(example, get_template(name)), ensure_ascii=False).encode("utf-8")


@FUZZ
@given(rows=st.lists(record | json_values, max_size=6), fmt=st.sampled_from(list(FORMATS)))
def test_every_reader_keeps_or_counts_every_row(rows, fmt):
    located = [(f"f:{i}", row) for i, row in enumerate(rows)]
    results = list(read_rows(located, fmt))
    assert [location for location, _ in results] == [location for location, _ in located]
    for _, result in results:
        if isinstance(result, BadRow):
            assert result.reason and result.detail
        else:
            assert isinstance(result, Example)
            _check_example(result)
    detect_format(rows[0] if rows and isinstance(rows[0], dict) else {})


def _line(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


lines = st.lists(json_values.map(_line) | st.binary(max_size=16) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")), max_size=8)


@FUZZ
@given(lines=lines, separator=st.sampled_from([b"\n", b"\r\n", b"\r"]), bom=st.booleans())
def test_iter_json_rows_counts_every_line(lines, separator, bom):
    import re

    body = (b"\xef\xbb\xbf" if bom else b"") + separator.join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(body)
        try:
            rows = list(iter_json_rows(path))
        except DataError as error:
            assert body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["), error  # only a broken array is whole-file
            return
    if body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return  # read as one array
    numbers = [int(location.rsplit(":", 1)[1]) for location, _ in rows]
    assert numbers == sorted(set(numbers))
    pieces = re.split(rb"\r\n|\r|\n", body)
    expected = []
    for number, piece in enumerate(pieces, start=1):
        try:
            blank = not piece.removeprefix(b"\xef\xbb\xbf").decode("utf-8").strip()
        except UnicodeDecodeError:
            blank = False
        if not blank:
            expected.append(number)
    assert numbers == expected


@FUZZ
@given(values=st.lists(json_values, max_size=6), deep_at=st.integers(min_value=0, max_value=6), indent=st.sampled_from([None, 2]))
def test_iter_json_rows_reads_every_array_element(values, deep_at, indent):
    deep = "[" * 5_000 + "]" * 5_000  # deeper than the recursion limit (1000) lets the parser go
    elements = [json.dumps(v, ensure_ascii=False, indent=indent) for v in values]
    deep_at = min(deep_at, len(elements))
    elements.insert(deep_at, deep)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.json"
        path.write_bytes(("[" + ",\n".join(elements) + "]").encode("utf-8", errors="surrogatepass"))
        rows = list(iter_json_rows(path))
    assert [location for location, _ in rows] == [f"{path}[{i}]" for i in range(len(elements))]
    assert isinstance(rows[deep_at][1], BadRow) and rows[deep_at][1].reason == "too_deep"
    kept = [row for i, (_, row) in enumerate(rows) if i != deep_at]
    assert len(kept) == len(values)
