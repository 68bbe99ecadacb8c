"""glmkit's cache: `glmkit cache` lists and cleans it; start-up removes what killed builds left; Ctrl-C during a
conversion leaves nothing; and the embedded model's first start keeps only what later starts load (its int8 copy
on a CPU that quantizes it, its float32 conversion elsewhere). The default model is played by a tiny GGUF."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from checkpoint_fixtures import llama_config, random_llama_state, write_gguf
from glmkit import cli
from glmkit.models import default, gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GLMKIT_CACHE", str(root))
    return root


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, hf_tokenizer_dir):
    from glmkit.tokenizers.hf import HFTokenizer

    config = llama_config(HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size, "qwen2")
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", random_llama_state(config, seed=9), config,
                      hf_tokenizer_dir)


def write(path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)


def fake_cache(root, dead_pid, source_gguf):
    """One of each kind of entry (`source_gguf` is made if missing); returns {kind: path}."""
    if not source_gguf.exists():
        write(source_gguf, 10)
    converted = root / "converted"
    entries = {
        "orphan": converted / f"model-abc.tmp{dead_pid}",
        "building": converted / f"model-def.tmp{os.getpid()}",
        "stale": converted / "gone-0123456789ab",
        "default_float": default.float_dir(),
        "default_gguf": default.gguf_path(),
        "current": gguf.converted_dir(source_gguf),
        "unknown": root / "notes.txt",
    }
    write(entries["orphan"] / "model.safetensors", 5000)
    write(entries["building"] / "model.safetensors", 100)
    write(entries["stale"] / "model.safetensors", 3000)
    (entries["stale"] / gguf.CONVERTED_MARKER).write_text("/no/such/model.gguf")
    for name in ("default_float", "current"):
        write(entries[name] / "model.safetensors", 2000)
        (entries[name] / "config.json").write_text("{}")
    (entries["default_float"] / gguf.CONVERTED_MARKER).write_text(str(entries["default_gguf"]))
    (entries["current"] / gguf.CONVERTED_MARKER).write_text(str(source_gguf.resolve()))
    write(entries["default_gguf"], 4000)
    write(entries["unknown"], 10)
    return entries


@pytest.fixture
def float32_start(monkeypatch):
    """The default start here loads float32 (as on a CPU with neither AVX2 nor bf16 instructions)."""
    monkeypatch.setattr(default, "start_quantization", lambda device_type: None)


@pytest.fixture
def int8_start(monkeypatch):
    """The default start here quantizes to int8 (as on a CPU with bf16 instructions but no fbgemm)."""
    monkeypatch.setattr(default, "start_quantization", lambda device_type: "int8" if device_type == "cpu" else None)


def test_list_shows_sizes_total_and_the_default_start(cache, dead_pid, tmp_path, capsys, float32_start):
    source = tmp_path / "mine.gguf"
    entries = fake_cache(cache, dead_pid, source)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "total" in out
    rows = {line.split()[3] if line.startswith("*") or line.startswith("-") else line.split()[2]: line
            for line in out.splitlines()[1:-1]}
    assert rows[f"converted/{default.float_dir().name}"].startswith("*")  # what a start with no flags loads
    assert rows[f"converted/{entries['orphan'].name}"].startswith("-") and "killed" in out
    assert rows[f"converted/{entries['stale'].name}"].startswith("-")
    assert rows[f"models/{default.FILE_NAME}"].startswith("-")
    assert rows[f"converted/{entries['current'].name}"].startswith(" ") and str(source.resolve()) in out
    assert rows[f"converted/{entries['building'].name}"].startswith(" ")
    assert "5.0 kB" in rows[f"converted/{entries['orphan'].name}"]
    assert capsys.readouterr().out == "" and cli.main(["cache", "list"]) == 0


def test_clean_removes_what_no_start_needs(cache, dead_pid, tmp_path, capsys, float32_start):
    source = tmp_path / "mine.gguf"
    entries = fake_cache(cache, dead_pid, source)
    assert cli.main(["cache", "clean"]) == 0
    gone = {name for name, path in entries.items() if not path.exists()}
    assert gone == {"orphan", "stale", "default_gguf"}
    assert "freed 12.0 kB" in capsys.readouterr().out


def test_clean_all_yes_empties_the_cache(cache, dead_pid, tmp_path, float32_start):
    fake_cache(cache, dead_pid, tmp_path / "missing.gguf")
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "cache", "clean", "--all", "--yes"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert list(cache.iterdir()) == []


def test_clean_all_without_a_terminal_needs_yes(cache, dead_pid, tmp_path, float32_start):
    fake_cache(cache, dead_pid, tmp_path / "missing.gguf")
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "cache", "clean", "--all"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 2 and "--yes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (cache / "notes.txt").exists()


def test_start_up_removes_orphans_of_dead_processes_only(cache, dead_pid, tiny_gguf):
    from glmkit import LLM

    orphan_dir = cache / "converted" / f"x-123.tmp{dead_pid}"
    orphan_file = cache / "models" / f"{default.FILE_NAME}.tmp{dead_pid}"
    live = cache / "converted" / f"y-456.tmp{os.getpid()}"
    for path in (orphan_dir / "model.safetensors", orphan_file, live / "model.safetensors"):
        write(path, 10)
    LLM(str(tiny_gguf), device="cpu", max_num_seqs=1)  # a GGUF start: converts into the cache
    assert not orphan_dir.exists() and not orphan_file.exists() and live.exists()


def test_a_killed_unreaped_process_counts_as_dead(cache):
    """kill -9 leaves a zombie until its parent reaps it; its scratch is an orphan all the same."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert gguf.pid_alive(proc.pid)
        proc.kill()
        scratch = cache / "converted" / f"x-1.tmp{proc.pid}"
        write(scratch / "model.safetensors", 10)
        deadline = time.monotonic() + 10
        while gguf.pid_alive(proc.pid) and time.monotonic() < deadline:  # the signal takes a moment to land
            time.sleep(0.05)
        assert gguf.remove_orphans() == [scratch] and not scratch.exists()
    finally:
        proc.wait()


def test_ctrl_c_during_conversion_leaves_nothing(cache, tiny_gguf, monkeypatch):
    def interrupted(reader, out):
        assert (out / "model.safetensors").is_file()  # half-way: the weights are written
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf.ensure_converted(tiny_gguf)
    assert list((cache / "converted").iterdir()) == []


def test_removing_a_directory_never_leaves_a_finished_looking_half(cache, monkeypatch):
    """Deleting is rename-then-delete: a removal cut short leaves a scratch name, found as an orphan later."""
    target = cache / "converted" / "model-abc"
    write(target / "model.safetensors", 10)
    (target / "config.json").write_text("{}")

    def cut_short(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        gguf.remove_path(target)
    assert not target.exists() and gguf.scratch_path(target).exists()


# -- the embedded model's first start, played by a tiny GGUF ----------------------------------------------------

@pytest.fixture
def tiny_default(cache, tiny_gguf, monkeypatch):
    """`LLM()` loads the tiny GGUF as if it were the embedded model; no GPU decides the default start."""
    import torch

    def assemble():
        target = default.gguf_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_gguf, target)
        return target

    monkeypatch.setattr(default, "default_gguf_path", assemble)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return cache


def cached_names(root) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for sub in ("converted", "models") if (root / sub).is_dir()
            for p in (root / sub).iterdir()}


def test_quantizing_cpu_keeps_only_the_int8_copy(tiny_default, monkeypatch, int8_start):
    from glmkit import LLM

    first = LLM(max_num_seqs=1)
    copy = default.quantized_dir("int8-g32")
    assert first.model_dir == copy and first.quantization.source == "glmkit"
    assert cached_names(tiny_default) == {f"converted/{copy.name}"}  # no float32 conversion, no GGUF
    # A later start loads the copy directly: nothing is assembled or converted again.
    monkeypatch.setattr(default, "default_gguf_path", lambda: pytest.fail("assembled again"))
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted again"))
    again = LLM(max_num_seqs=1)
    assert again.model_dir == copy and again.quantization.mode == default.start_quantization("cpu")


def test_float32_start_keeps_the_float32_conversion(tiny_default, float32_start):
    from glmkit import LLM

    first = LLM(max_num_seqs=1)
    assert first.model_dir == default.float_dir() and first.quantization is None
    assert cached_names(tiny_default) == {f"converted/{default.float_dir().name}"}
    # --quantization int8 makes a copy; the float32 conversion stays, as the default start here loads it.
    flagged = LLM(max_num_seqs=1, quantization="int8")
    assert flagged.model_dir == default.quantized_dir("int8-g32")
    assert default.is_built(default.float_dir())


def test_unwritable_copy_quantizes_in_memory_and_keeps_the_conversion(tiny_default, monkeypatch, int8_start):
    from glmkit import LLM
    from glmkit.models import export

    def unwritable(*args):
        raise PermissionError(13, "Permission denied", "/read-only/cache")

    monkeypatch.setattr(export, "cached_quantized_copy", unwritable)
    llm = LLM(max_num_seqs=1)
    assert llm.quantization.mode == default.start_quantization("cpu") and llm.quantization.source == "fresh"
    assert llm.model_dir == default.float_dir() and default.is_built(default.float_dir())


# -- the first start's steps: labelled, and the GGUF header read quickly ----------------------------------------

def test_conversion_labels_every_step_without_a_bar(cache, tiny_gguf, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="glmkit"):
        gguf.ensure_converted(tiny_gguf)
    steps = [r.getMessage() for r in caplog.records if r.name == "glmkit.steps"]
    assert [s.split(" ")[1] for s in steps] == ["reading", "writing", "building"], steps


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_0"])
def test_gguf_file_reads_what_gguf_reader_reads(tmp_path, hf_tokenizer_dir, quant):
    """glmkit's one-pass header reader against the gguf package's own: the same fields and tensors."""
    import numpy as np
    from gguf import GGUFReader

    from glmkit.tokenizers.hf import HFTokenizer

    config = llama_config(HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size, "qwen2")
    path = write_gguf(tmp_path / f"{quant}.gguf", random_llama_state(config, seed=3), config, hf_tokenizer_dir,
                      quant=quant)
    ours, theirs = gguf.GGUFFile(path), GGUFReader(str(path))
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.tensor_type, t.data.dtype, t.data.shape) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.dtype, t.data.shape) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_a_truncated_gguf_is_one_clear_error(cache, tiny_gguf, tmp_path):
    from glmkit.errors import ModelLoadError

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="truncated"):
        gguf.ensure_converted(cut)
    assert list((cache / "converted").iterdir()) == []
