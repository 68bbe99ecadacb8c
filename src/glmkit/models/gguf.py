"""GGUF file -> a cached Hugging Face-style directory (config.json, model.safetensors in fp32, tokenizer.json,
tokenizer_config.json with the chat template), converted once with a progress bar and reused afterwards.

Also the cache's building blocks: where it lives (GLMKIT_CACHE or ~/.cache/glmkit), `build_once` (a scratch
`NAME.tmp<PID>` renamed into place when complete) and finding scratch entries whose process died.

Supports the `qwen2` and `llama` architectures and every quant type the `gguf` package can dequantize
(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K ...). Knows nothing of generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
from math import prod
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..errors import ModelLoadError
from ..tokenizers.gguf_vocab import TOKEN_TYPE_CONTROL, build_bpe_tokenizer, write_tokenizer_json

SUPPORTED_ARCHS = ("qwen2", "llama")
CONVERTED_MARKER = ".glmkit-converted"
SCRATCH_NAME = re.compile(r"(?P<name>.+)\.tmp(?P<pid>\d+)")
# One line before each long step that has no progress bar (writing weights, building a tokenizer...), so a first
# start has no silent gap. A child of "glmkit": a UI that quiets glmkit's log quiets these too.
steps = logging.getLogger("glmkit.steps")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def cache_root() -> Path:
    return Path(os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit")


def converted_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}"


def quantized_copy_dir(model_dir: Path, tag: str) -> Path:
    """Where the quantized copy (QuantPlan.tag, e.g. int8-g32) of a cached model directory lives: beside it."""
    return model_dir.with_name(f"{model_dir.name}-{tag}")


def scratch_path(out: Path) -> Path:
    """The scratch name this process builds `out` under; its PID tells a later start whether it is orphaned."""
    return out.with_name(f"{out.name}.tmp{os.getpid()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    try:  # a killed process whose parent has not reaped it yet (a zombie) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): trust kill(pid, 0)
        return True


def orphaned_scratch(root: Path | None = None) -> list[Path]:
    """Scratch files and directories (`NAME.tmp<PID>`) in the cache whose process is gone: left by a build that
    was killed (kill -9, a crash, a power cut), when no `finally` could remove them. A PID reused by an unrelated
    process keeps its entry until that process exits, which errs on the safe side."""
    root = root or cache_root()
    found = []
    for folder in (root, *(p for p in _children(root) if p.is_dir() and not SCRATCH_NAME.fullmatch(p.name))):
        for entry in _children(folder):
            match = SCRATCH_NAME.fullmatch(entry.name)
            if match and not pid_alive(int(match["pid"])):
                found.append(entry)
    return found


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # no cache yet, or unreadable: nothing to clean
        return []


def remove_path(path: Path) -> None:
    """Remove a cache entry. A directory is renamed to this process's scratch name first: one half-deleted by
    Ctrl-C or a kill never looks finished, and a later start removes it as an orphan."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    doomed = path if SCRATCH_NAME.fullmatch(path.name) else scratch_path(path)
    if doomed != path:
        if doomed.exists():  # left by an earlier removal in a process with this PID
            shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_orphans(root: Path | None = None) -> list[Path]:
    """Remove what killed builds left behind (called at start-up, before anything is built)."""
    orphans = orphaned_scratch(root)
    for path in orphans:
        remove_path(path)
    if orphans:
        steps.info("glmkit: removed %d unfinished build(s) left in the cache by a killed process", len(orphans))
    return orphans


def build_once(out: Path, build: Callable[[Path], None], done: str) -> Path:
    """`out`, built by `build(tmp)` in a scratch directory that is renamed into place when complete, unless
    `out/done` shows an earlier build finished. An interrupted build (an exception, Ctrl-C) leaves nothing
    half-written behind; a killed one leaves a scratch directory that `remove_orphans` finds by its PID."""
    if (out / done).is_file():
        return out
    tmp = scratch_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_converted(gguf_path: Path, out: Path | None = None) -> Path:
    """Return the converted directory for a GGUF file (`out`, or one keyed by the file's path, size and time),
    converting it on first use. The marker names the source, so `glmkit cache` can tell a stale conversion."""
    def build(tmp: Path) -> None:
        convert(gguf_path, tmp)
        (tmp / CONVERTED_MARKER).write_text(str(gguf_path.resolve()))

    remove_orphans()
    return build_once(out or converted_dir(gguf_path), build, CONVERTED_MARKER)


def is_current_conversion(model_dir: Path) -> bool:
    """A finished conversion whose GGUF file still exists unchanged (so `--model that.gguf` would load it)."""
    try:
        source = Path((model_dir / CONVERTED_MARKER).read_text().strip())
        return source.is_file() and converted_dir(source) == model_dir
    except OSError:
        return False


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray     # a view of the file: elements for float/int types, block bytes per row for quantized ones


_METADATA_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                    11: "<i8", 12: "<f8"}  # GGUF metadata value type -> numpy dtype (8 is a string, 9 an array)
_STRING, _ARRAY = 8, 9
_ELEMENT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
_U64 = struct.Struct("<Q")


class GGUFFile:
    """A GGUF file's metadata as Python values and its tensors as views of the memory-mapped file.

    Read in one pass with struct: the gguf package's GGUFReader builds numpy views of every vocabulary string,
    10-20 s for a 150k-token vocabulary on a busy 2-core CPU (the longest silent step of the first start); this
    reads the same fields in well under a second. Little-endian GGUF v2/v3, as llama.cpp writes them."""

    def __init__(self, path: Path):
        self._mapped = np.memmap(path, mode="r")
        self._buf, self._offs = memoryview(self._mapped), 0
        magic, version, num_tensors, num_fields = self._unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"magic {magic!r} version {version}: not a little-endian GGUF v2/v3 file")
        self.fields = {}
        for _ in range(num_fields):
            key = self._strings(1)[0]
            self.fields[key] = self._value(self._unpack("<I")[0])
        infos = [self._tensor_info() for _ in range(num_tensors)]
        align = self.fields.get("general.alignment", 32)
        start = -(-self._offs // align) * align
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._offs)
        self._offs += struct.calcsize(fmt)
        return values

    def _strings(self, count: int) -> list[str]:
        buf, offs, out = self._buf, self._offs, []
        for _ in range(count):  # the hot loop: a vocabulary is 150k of these
            (length,) = _U64.unpack_from(buf, offs)
            out.append(str(buf[offs + 8:offs + 8 + length], "utf-8"))
            offs += 8 + length
        self._offs = offs
        return out

    def _value(self, kind: int):
        if kind == _STRING:
            return self._strings(1)[0]
        if kind != _ARRAY:
            return self._elements(kind, 1)[0]
        item_kind, count = self._unpack("<IQ")
        if item_kind == _STRING:
            return self._strings(count)
        if item_kind == _ARRAY:
            return [self._value(_ARRAY) for _ in range(count)]
        return self._elements(item_kind, count)

    def _elements(self, kind: int, count: int) -> list:
        dtype = np.dtype(_METADATA_DTYPES[kind])
        values = np.frombuffer(self._buf, dtype, count, self._offs).tolist()
        self._offs += dtype.itemsize * count
        return values

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._strings(1)[0]
        (num_dims,) = self._unpack("<I")
        dims = list(self._unpack(f"<{num_dims}Q"))
        kind, offset = self._unpack("<IQ")
        return name, dims, kind, offset

    def _tensor(self, name: str, dims: list[int], kind: int, offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(kind)
        shape = tuple(reversed(dims))  # GGUF lists dims fastest-first
        dtype, count = _ELEMENT_DTYPES.get(qtype.name), prod(dims)
        if dtype is None:  # quantized blocks, kept as bytes: one row of blocks per row
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            dtype, count = "<u1", count * type_size // block_size
            shape = quant_shape_to_byte_shape(shape, qtype)
        return GGUFTensor(name, qtype, np.frombuffer(self._buf, dtype, count, offset).reshape(shape))


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for the llama architecture (interleaved -> NeoX halves)."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    steps.info("glmkit: reading the header and vocabulary of %s (once)", gguf_path.name)
    try:
        reader = GGUFFile(gguf_path)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path} ({type(e).__name__}: {e}); it is probably "
                             "truncated or not a GGUF file")
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    config = _hf_config(reader, arch)
    state = {}
    # A context manager: on Ctrl-C the bar ends its line before `glmkit: interrupted` is printed.
    with tqdm(reader.tensors, desc=f"converting {gguf_path.name} (once)", unit="tensor") as tensors:
        for t in tensors:
            name = _hf_name(t.name)
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute(w, config["num_attention_heads"])
            elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute(w, config["num_key_value_heads"])
            state[name] = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy())
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    size = sum(t.numel() * t.element_size() for t in state.values())
    steps.info("glmkit: writing the float32 weights (%.1f GB; once)", size / 1e9)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    steps.info("glmkit: building the tokenizer from the GGUF vocabulary (once)")
    _write_tokenizer(reader, out)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelLoadError(f"GGUF tensor {name!r} is not part of a supported qwen2/llama model")


def _hf_config(reader, arch: str) -> dict:
    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    heads, hidden = key("attention.head_count"), key("embedding_length")
    return {
        "model_type": arch, "_name_or_path": _field(reader, "general.name", ""),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"]), "hidden_size": hidden,
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads), "intermediate_size": key("feed_forward_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096), "attention_bias": arch == "qwen2",
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _write_tokenizer(reader, out: Path) -> None:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2'); "
                             "use the model's Hugging Face directory with tokenizer.json instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges") or []
    tok = build_bpe_tokenizer(tokens, types, merges, _field(reader, "tokenizer.ggml.pre", "default"))
    write_tokenizer_json(tok, out / "tokenizer.json", {i for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL})
    tok_config = {}
    for name in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            tok_config["pad_token" if name == "padding" else f"{name}_token"] = tokens[token_id]
    tok_config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2))
