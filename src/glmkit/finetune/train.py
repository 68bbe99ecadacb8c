"""The LoRA training loop: a base model loaded by the same loader as inference, LoRA modules on its linears,
AdamW over the adapters only, warm-up then cosine (or linear) decay, gradient accumulation and clipping, a
progress bar, a JSONL log, evaluation loss every N steps, and checkpoints every N steps that `resume` continues
from with the same data order (a run killed at any point loses at most one interval; Ctrl-C or SIGTERM saves
one first).

Data order is a function of (seed, epoch) alone, so a resumed run sees exactly the batches the uninterrupted
run would have. Knows nothing of file formats (data.py) or of the command line (commands/finetune.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import InvalidParameterError, ModelLoadError
from ..models import training
from ..models.lora import LoraConfig, add_lora, checkpoint_names, save_adapter, select_targets, targets_of
from ..models.ptuning import PrefixEncoder, load_prefix, save_prefix
from .data import PackedSample, Sample

log = logging.getLogger("glmkit")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    method: str = "lora"                # lora | ptuning (P-Tuning v2, ChatGLM checkpoints)
    lora: LoraConfig = field(default_factory=LoraConfig)
    pre_seq_len: int = 128              # ptuning: prefix length
    prefix_projection: bool = False     # ptuning: ChatGLM's MLP over the prefix embedding
    learning_rate: float = 2e-4
    epochs: int = 3
    max_steps: int | None = None        # optimizer steps; overrides epochs
    batch_size: int = 4                 # samples per optimizer step
    micro_batch_size: int = 1           # samples per forward pass (batch_size / micro_batch_size accumulated)
    warmup_ratio: float = 0.1
    schedule: str = "cosine"            # cosine | linear | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int | None = None       # steps; None: at each epoch's end when eval data is given
    save_every: int | None = None       # steps; None: at each epoch's end
    save_total_limit: int = 2           # checkpoints kept (the newest)
    recompute: bool = False             # activation checkpointing
    one_row: bool = False               # each micro-batch's samples side by side in one row (CPU), not padded
    compiled: bool = False              # torch.compile the decoder layer (GPU)

    def check(self) -> None:
        if self.method not in ("lora", "ptuning"):
            raise InvalidParameterError("method", self.method, "must be lora or ptuning")
        self.lora.check()
        if not self.learning_rate > 0:
            raise InvalidParameterError("learning_rate", self.learning_rate, "must be > 0 (LoRA: 1e-4 to 5e-4)")
        for name in ("epochs", "batch_size", "micro_batch_size", "save_total_limit"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, getattr(self, name), "must be a whole number >= 1")
        if self.batch_size % self.micro_batch_size:
            raise InvalidParameterError("batch_size", self.batch_size, f"must be a multiple of micro_batch_size "
                                        f"({self.micro_batch_size})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise InvalidParameterError("schedule", self.schedule, "must be cosine, linear or constant")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidParameterError("warmup_ratio", self.warmup_ratio, "must be in [0, 1)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@functools.lru_cache(maxsize=2)  # every step of an epoch reads it: shuffled once, not once per step
def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The sample order of one epoch: depends only on (seed, epoch), so a resumed run repeats it."""
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def collate(samples: list[Sample], device, one_row: bool = False):
    """Samples (or packed samples) -> input_ids, loss_mask, positions [B, L] and the attention mask (None: plain
    causal). `one_row`: every sample side by side in a single row (attention kept inside each), so there is no
    padding and each weight is read once per micro-batch: on a CPU, where a matmul of a few dozen rows is bound
    by reading the weight, that is several times faster than a padded batch."""
    if one_row and len(samples) > 1:
        samples = [PackedSample([t for s in samples for t in s.input_ids], [m for s in samples for m in s.loss_mask],
                                [n for s in samples for n in (getattr(s, "lengths", None) or [len(s.input_ids)])])]
    length = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for b, s in enumerate(samples):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[b, : len(s.loss_mask)] = torch.tensor(s.loss_mask)
    lengths = [list(getattr(s, "lengths", None) or [len(s.input_ids)]) for s in samples]
    positions, attn_mask = training.positions_and_mask(lengths, length, device)
    return ids.to(device), mask.to(device), positions, attn_mask


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


class Trainer:
    """Trains LoRA adapters on `model` (a DecoderModel loaded from a checkpoint with `tensor_names`, which name the
    adaptable modules) and writes them to `out_dir`."""

    def __init__(self, model, tensor_names: list[str], base_name: str, config: TrainConfig, out_dir: Path,
                 train: list[Sample], dev: list[Sample] | None = None, base_config: dict | None = None):
        config.check()
        self.model, self.config, self.out_dir = model, config, out_dir
        self.base_name, self.train, self.dev = base_name, train, dev or []
        self.base_config = base_config or {}  # config.json of the base: P-Tuning v2 saves it with its prefix
        self.device = next(model.parameters()).device
        torch.manual_seed(config.seed)  # the adapters' initial values
        self.parts: dict = {}
        self.prefix: PrefixEncoder | None = None
        if config.method == "ptuning":
            for p in model.parameters():
                p.requires_grad_(False)
            self.prefix = PrefixEncoder(model.config, config.pre_seq_len, config.prefix_projection).to(self.device)
            self.params = list(self.prefix.parameters())
        else:
            targets = select_targets(targets_of(tensor_names, model.config, model), config.lora.target_modules)
            self.parts = add_lora(model, targets, config.lora)
            self.params = [p for holder in {id(h): h for h in self.parts.values()}.values()
                           for p in (holder.lora_A, holder.lora_B)]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")  # one kernel for every adapter
        per_epoch = math.ceil(len(train) / config.batch_size)
        self.steps_per_epoch = per_epoch
        self.total_steps = config.max_steps or per_epoch * config.epochs
        self.warmup = int(self.total_steps * config.warmup_ratio)
        self.step = 0
        self.stop_requested = False
        # Data parallel (torchrun): every rank runs the same steps on its share of each batch; gradients are summed
        # across ranks, so a step equals the single-process step on the whole batch.
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        if self.world > 1:
            for p in self.params:  # the same starting adapters everywhere
                dist.broadcast(p.data, src=0)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    # -- one optimizer step --------------------------------------------------------------------------------
    def _batch(self, step: int) -> list[Sample]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train), self.config.seed, epoch)
        return [self.train[i] for i in order[index * self.config.batch_size:(index + 1) * self.config.batch_size]]

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _sum_gradients(self) -> None:
        """Sum the adapters' gradients over the ranks (one flat buffer, one all-reduce)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(self.params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def train_step(self) -> dict:
        cfg = self.config
        batch = self._batch(self.step)
        num_targets = sum(sum(s.loss_mask[1:]) for s in batch)  # of the whole batch: every rank knows it
        batch = batch[self.rank::self.world]
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule)
        self.model.train()
        if self.prefix is not None:
            self.prefix.train()
        total_loss, num_tokens = 0.0, 0
        for start in range(0, len(batch), cfg.micro_batch_size):
            ids, mask, positions, attn_mask = collate(batch[start:start + cfg.micro_batch_size], self.device,
                                                      cfg.one_row)
            hidden = training.hidden_states(self.model, ids, positions, attn_mask, recompute=cfg.recompute,
                                            compiled=cfg.compiled, prefix=self._prefix_kv())
            loss = training.target_loss(self.model, hidden, ids, mask)
            (loss / max(1, num_targets)).backward()
            total_loss += loss.item()
            num_tokens += ids.numel()
        if self.world > 1:
            self._sum_gradients()
            total_loss, num_tokens = self._all_sum([total_loss, num_tokens])
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
                "loss": total_loss / max(1, num_targets), "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(norm), "tokens": int(num_tokens), "target_tokens": num_targets}

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        if not self.dev:
            return None
        self.model.eval()
        if self.prefix is not None:
            self.prefix.eval()
        total, count = 0.0, 0
        mine = self.dev[self.rank::self.world]
        for start in range(0, len(mine), self.config.micro_batch_size):
            chunk = mine[start:start + self.config.micro_batch_size]
            ids, mask, positions, attn_mask = collate(chunk, self.device, self.config.one_row)
            hidden = training.hidden_states(self.model, ids, positions, attn_mask, prefix=self._prefix_kv())
            total += training.target_loss(self.model, hidden, ids, mask).item()
            count += int(mask[:, 1:].sum())
        total, count = self._all_sum([total, count])
        return total / max(1, count)

    def _prefix_kv(self):
        return None if self.prefix is None else self.prefix(self.model.embed.weight.dtype)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, directory: Path, with_state: bool) -> None:
        if self.prefix is not None:
            save_prefix(directory, self.prefix, self.base_config)
        else:
            save_adapter(directory, self.parts, self.config.lora, self.base_name)
        if with_state:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            tmp = directory / (STATE_FILE + ".partial")
            torch.save(state, tmp)
            tmp.replace(directory / STATE_FILE)

    def checkpoint(self) -> Path:
        """Rank 0 writes it (the ranks hold the same adapters and optimizer state); the others wait for it."""
        directory = self.out_dir / f"checkpoint-{self.step}"
        if self.rank == 0:
            self._write_checkpoint(directory)
        if self.world > 1:
            dist.barrier()
        return directory

    def _write_checkpoint(self, directory: Path) -> None:
        self.save(directory, with_state=True)
        kept = sorted(checkpoints(self.out_dir), key=lambda p: int(p.name.rpartition("-")[2]))
        for old in kept[:-self.config.save_total_limit]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def resume_from(self, directory: Path) -> None:
        """Continue from a checkpoint: its adapter weights, optimizer moments, step and random state."""
        from ..models.lora import read_adapter

        if self.prefix is not None:
            load_prefix(directory, self.prefix)
        adapter = read_adapter(directory) if self.parts else None
        for path, holder in self.parts.items():
            if path not in adapter.weights:
                raise ModelLoadError(f"checkpoint {directory} has no weights for {path!r}: it was made with other "
                                     "--target-modules; resume with the same settings")
            holder.set(path, *adapter.weights[path])
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log_path = self.out_dir / LOG_FILE  # steps after the checkpoint are run again: their old rows go
        if self.rank == 0 and log_path.is_file():
            rows = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            log_path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        """Train to the last step (or until asked to stop: then a checkpoint). Rank 0 alone writes the log, the
        checkpoints and the adapter, and shows the progress bar."""
        from tqdm import tqdm

        cfg = self.config
        lead = self.rank == 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_every = cfg.save_every or self.steps_per_epoch
        eval_every = cfg.eval_every or self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (progress and lead), dynamic_ncols=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._request_stop)
        last: dict = {}
        started, tokens = time.perf_counter(), 0
        logf = open(self.out_dir / LOG_FILE, "a", encoding="utf-8") if lead else None
        try:
            while self.step < self.total_steps and not self._stopping():
                last = self.train_step()
                tokens += last["tokens"]
                last["tokens_per_s"] = round(tokens / (time.perf_counter() - started), 1)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    eval_loss = self.eval_loss()
                    if eval_loss is not None:
                        last["eval_loss"] = eval_loss
                if logf:  # before the checkpoint: a run killed once a checkpoint exists has logged its step
                    logf.write(json.dumps(last) + "\n")
                    logf.flush()
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.checkpoint()
                bar.set_postfix(_postfix(last, self.device), refresh=False)
                bar.update()
            if self.stop_requested and self.step < self.total_steps:
                last["stopped"] = str(self.checkpoint())
                return last
        finally:
            bar.close()
            if logf:
                logf.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if lead:
            self.save(self.out_dir, with_state=False)
            (self.out_dir / CONFIG_FILE).write_text(json.dumps(
                {"base_model": self.base_name, "world_size": self.world, **asdict(cfg)},
                indent=2, default=str), encoding="utf-8")
        if self.world > 1:
            dist.barrier()
        return last

    def _stopping(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop after the same step)."""
        if self.world > 1:
            self.stop_requested = self._all_sum([float(self.stop_requested)])[0] > 0
        return self.stop_requested

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.stop_requested = True


def _postfix(row: dict, device) -> dict:
    shown = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    if "eval_loss" in row:
        shown["eval"] = f"{row['eval_loss']:.3f}"
    if device.type == "cuda":
        shown["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    return shown


def checkpoints(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()] if out_dir.is_dir() else []


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return max(found, key=lambda p: int(p.name.rpartition("-")[2])) if found else None


@dataclass
class Base:
    """A base model loaded for training, with what renders its data."""
    model: torch.nn.Module
    tensor_names: list[str]  # the checkpoint's, which name the modules a LoRA can adapt
    raw_config: dict         # its config.json
    name: str                # written into the adapter as base_model_name_or_path
    chat_format: object


def load_base(model: str | None, device: str = "auto", dtype: str = "auto", chat_format: str | None = None,
              quantization: str | None = None) -> Base:
    """The base model (bf16 on a GPU and on a CPU with bf16 instructions, else fp32; int8/int4 weights if asked,
    kept in the portable layout and dequantized one layer at a time), its tokenizer and chat format, loaded as
    inference loads them."""
    from ..chat import get_chat_format
    from ..config import DTYPES
    from ..llm import resolve_model_dir
    from ..models import default
    from ..models.loader import load_model, read_config
    from ..models.quant import plan_for
    from ..tokenizers import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device", device, "CUDA is not available on this machine; use cpu")
    target = torch.device(device)
    name = DTYPES[dtype] or ("bfloat16" if target.type == "cuda" or default.cpu_has_bf16() else "float32")
    model_dir = default.ensure_float_dir() if model is None else resolve_model_dir(model)
    raw, config = read_config(model_dir)
    plan = plan_for(raw, quantization)
    base_name = default.NAME if model is None else str(Path(model).expanduser().resolve())
    tokenizer = load_tokenizer(model_dir)
    fmt = get_chat_format(chat_format, tokenizer=tokenizer, model_type=config.model_type,
                          model_name=(default.NAME if model is None else config.name or model_dir.name),
                          eos_token_ids=config.eos_token_ids)
    log.info("glmkit: loading %s (%s%s, %s)", model_dir, name, f", {plan.mode} weights" if plan else "", target)
    loaded = load_model(model_dir, config, getattr(torch, name), target, plan, pack=False)
    return Base(loaded, checkpoint_names(model_dir), raw, base_name, fmt)
