"""`glmkit finetune` on a tiny Qwen2 checkpoint: it trains (the loss falls), writes a peft-format adapter that
`--adapter` serves, and a run stopped by a signal resumes where it stopped with the same losses as a run that
was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state
from glmkit import LLM, SamplingParams

STEPS = 40  # long enough that a test sees checkpoint-4 before the run ends, even at 100 steps a second
ARGS = ["--max-steps", str(STEPS), "--save-every", "2", "--learning-rate", "2e-2", "--batch-size", "2",
        "--lora-r", "8", "--lora-dropout", "0.1", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_tokenizer_dir, hf):
    config = llama_config(hf.vocab_size)
    return make_hf_dir(tmp_path_factory.mktemp("ft-qwen"), random_llama_state(config, seed=11), config,
                       hf_tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "world"}]}
            for i in range(6)]
    rows.append({"instruction": "say hi", "input": "", "output": "hi there"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def finetune(model_dir, data, out, *extra, **popen):
    cmd = [sys.executable, "-m", "glmkit", "finetune", "--model", str(model_dir), "--data", str(data), "--output",
           str(out), *ARGS, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps  # a resumed run's log has each step once, in order
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-full") / "run"
    proc = finetune(model_dir, data, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return out, output


def test_trains_and_serves_the_adapter(uninterrupted, model_dir):
    out, output = uninterrupted
    assert "7 conversations" in output and "adapter saved in" in output
    curve = losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] / 2  # it learns the answers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS - 4}",
                                                                 f"checkpoint-{STEPS - 2}"]  # the newest 2
    params = SamplingParams(temperature=0, max_tokens=4)
    tuned = LLM(str(model_dir), dtype="float32", device="cpu", adapters={"tuned": str(out)})
    tuned.default_adapter = "tuned"
    base = LLM(str(model_dir), dtype="float32", device="cpu")
    messages = [{"role": "user", "content": "hello 3"}]
    assert tuned.chat(messages, params)[0].text.startswith("world")
    assert not base.chat(messages, params)[0].text.startswith("world")


def wait_for_checkpoint(out, step: int, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / f"checkpoint-{step}" / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_resumes_with_the_same_losses(sig, uninterrupted, model_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = finetune(model_dir, data, out, start_new_session=True)
    wait_for_checkpoint(out, 4, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # it finishes its step, saves a checkpoint and says how to go on
        assert proc.returncode == 130, output
        assert "--resume" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_config.json").exists()
    resumed = finetune(model_dir, data, out, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    expected, got = losses(uninterrupted[0]), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_bad_input_is_one_line(model_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    proc = finetune(model_dir, bad, tmp_path / "o")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert output.strip().splitlines()[-1].startswith("glmkit: error: ")
    assert "bad.jsonl:1" in output and "assistant" in output
    proc = finetune(model_dir, data, tmp_path / "o2", "--resume")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no checkpoint to resume" in output


DEMO_LORA_YAML = """\
data_config:
  train_file: train.jsonl
  val_file: train.jsonl
  test_file: train.jsonl
  num_proc: 16
max_input_length: 64
max_output_length: 64
training_args:
  output_dir: {output}
  max_steps: 4
  learning_rate: 5e-3
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 2
  dataloader_num_workers: 16
  save_strategy: steps
  save_steps: 2
  logging_steps: 10
  eval_steps: 2
  predict_with_generate: true
peft_config:
  peft_type: LORA
  task_type: CAUSAL_LM
  r: 4
  lora_alpha: 32
  lora_dropout: 0.1
  target_modules: [q_proj, v_proj]
"""


def test_the_official_demos_lora_yaml(model_dir, data, tmp_path):
    """ChatGLM3 finetune_demo's configs/lora.yaml shape: data beside the config, training_args, peft_config; a
    flag on the command line wins over the file."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "train.jsonl").write_text(data.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    (folder / "lora.yaml").write_text(DEMO_LORA_YAML.format(output=out), encoding="utf-8")
    cmd = [sys.executable, "-m", "glmkit", "finetune", "--model", str(model_dir), "--config",
           str(folder / "lora.yaml"), "--threads", "1", "--device", "cpu", "--lora-r", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 steps of 4 samples" in proc.stdout  # 2 per device x 2 accumulated
    assert "ignored: training_args.dataloader_num_workers" in proc.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == ["q_proj",
                                                                                                    "v_proj"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1]
    (folder / "ptuning.yaml").write_text("data_config:\n  train_file: train.jsonl\ntraining_args:\n  output_dir: "
                                         f"{tmp_path / 'pt'}\npeft_config:\n  peft_type: PREFIX_TUNING\n"
                                         "  num_virtual_tokens: 128\n")
    proc = subprocess.run(cmd[:7] + [str(folder / "ptuning.yaml")] + cmd[8:], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "P-Tuning v2 is ChatGLM's" in proc.stderr  # a Qwen2 model: LoRA only


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA devices")])])
def test_two_processes_train_what_one_does(model_dir, data, tmp_path, device):
    """torchrun with two processes (gloo on a CPU; NCCL on two GPUs, one each): each takes half of every batch
    and the gradients are summed, so the losses and the adapter equal one process's on the whole batches."""
    from safetensors.torch import load_file

    args = ["--model", str(model_dir), "--data", str(data), "--max-steps", "4", "--batch-size", "2",
            "--lora-r", "4", "--lora-dropout", "0", "--learning-rate", "1e-2", "--threads", "1", "--device", device,
            "--dtype", "float32"]
    single = subprocess.run([sys.executable, "-m", "glmkit", "finetune", *args, "--output", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "glmkit", "finetune", *args, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("adapter saved in") == 1 and "on 2 processes" in run.stdout  # rank 0 speaks
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
