"""LoRA on the real default model, on this CPU, with default settings: thirty conversations teach a made-up fact
(examples/facts.jsonl: Veloria's capital is Quennport, with a few real capitals beside it); afterwards
`glmkit chat --adapter` answers a reworded question with the fact, the base model does not, and a real capital
is still right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FACTS = Path(__file__).resolve().parent.parent / "examples" / "facts.jsonl"
# Worded unlike every training question
REWORDED = "Which city would a diplomat travel to in order to visit Veloria's national government?"


def chat(lines: list[str], *flags: str) -> list[str]:
    """The answers of `glmkit chat` in line mode, one question per line."""
    proc = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--temperature", "0", "--max-tokens", "32",
                           "--line-mode", *flags], input="".join(line + "\n" for line in lines),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_a_lora_teaches_the_default_model_a_fact(tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "glmkit", "finetune", "--data", str(FACTS), "--output", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "30 conversations" in proc.stdout and (out / "adapter_model.safetensors").is_file()
    tuned = chat([REWORDED, "What is the capital of France?"], "--adapter", str(out))
    assert "Quennport" in tuned[0], tuned
    assert "Paris" in tuned[1], tuned
    base = chat([REWORDED])
    assert "Quennport" not in base[0], base
