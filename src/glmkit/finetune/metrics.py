"""ROUGE-1/2/L and BLEU-4 of predictions against references, computed as ChatGLM3's official finetune_demo
(`finetune_hf.py`, `compute_metrics`; GLM-4's finetune demo is the same) computes them, so a score printed here
can be set beside one printed there:

- both texts are `strip()`ped and segmented with `jieba.cut` (spaces and newlines come out as tokens too);
- ROUGE: `rouge_chinese.Rouge().get_scores(' '.join(pred_tokens), ' '.join(label_tokens))`, each F-score x 100
  rounded to 4 decimals;
- BLEU-4: `nltk` `sentence_bleu([label_tokens], pred_tokens, smoothing_function=SmoothingFunction().method3)`,
  on the 0-1 scale: the demo does NOT multiply BLEU by 100 (ChatGLM-6B's older ptuning/main.py did, on
  characters instead of jieba words; its numbers are not comparable with these);
- every metric is the mean over samples (numpy's, as the demo's).

One deliberate difference: the demo raises on an empty prediction or reference (rouge_chinese: "Hypothesis is
empty."), losing the whole evaluation. Here such a sample scores 0 on every metric and is counted in
`num_empty`, so a model that answers nothing is scored down, not crashed on.

jieba, rouge-chinese and nltk are optional (`pip install 'glmkit[finetune]'`) and imported on first use. Knows
strings only: nothing of models, chat formats or data files.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from types import SimpleNamespace

from ..errors import GlmkitError

INSTALL_HINT = "pip install 'glmkit[finetune]'"


class MissingDependencyError(GlmkitError, ImportError):
    """An optional package that this feature needs is not installed."""


@lru_cache(maxsize=1)
def _libraries() -> SimpleNamespace:
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise MissingDependencyError(f"ROUGE/BLEU scoring needs jieba, rouge-chinese and nltk ({e.name} is "
                                     f"missing); install them with: {INSTALL_HINT}") from None
    # jieba logs "Building prefix dict ..." to stderr at DEBUG on its first cut: noise between our lines.
    jieba.setLogLevel(logging.WARNING)
    return SimpleNamespace(cut=jieba.cut, Rouge=Rouge, sentence_bleu=sentence_bleu,
                           smoothing=SmoothingFunction().method3)


def require() -> None:
    """Raise MissingDependencyError now if scoring will not be possible (call before minutes of generating)."""
    _libraries()


@dataclass(frozen=True)
class SampleScores:
    """One prediction's scores: ROUGE as percentages (0-100), BLEU-4 as a fraction (0-1), like the demo."""
    rouge_1: float
    rouge_2: float
    rouge_l: float
    bleu_4: float
    empty: bool = False  # the prediction or the reference was empty: scored 0 (the demo raises instead)

    def as_dict(self) -> dict:
        return {"rouge-1": self.rouge_1, "rouge-2": self.rouge_2, "rouge-l": self.rouge_l, "bleu-4": self.bleu_4,
                "empty": self.empty}


EMPTY = SampleScores(0.0, 0.0, 0.0, 0.0, empty=True)


@dataclass(frozen=True)
class Scores:
    """Means over samples. rouge_*: percentages (0-100); bleu_4: a fraction (0-1), as ChatGLM3's finetune_demo
    reports it (its `eval_bleu-4`), not a percentage."""
    rouge_1: float
    rouge_2: float
    rouge_l: float
    bleu_4: float
    num_samples: int
    num_empty: int  # samples with an empty prediction or reference, scored 0 and included in the means

    def as_dict(self) -> dict:
        """The demo's keys ("rouge-1", ..., "bleu-4"), plus the counts."""
        d = asdict(self)
        return {"rouge-1": d["rouge_1"], "rouge-2": d["rouge_2"], "rouge-l": d["rouge_l"], "bleu-4": d["bleu_4"],
                "num_samples": self.num_samples, "num_empty": self.num_empty}


def score_sample(prediction: str, reference: str) -> SampleScores:
    lib = _libraries()
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return EMPTY
    pred_tokens, label_tokens = list(lib.cut(prediction)), list(lib.cut(reference))
    try:
        rouge = lib.Rouge().get_scores(" ".join(pred_tokens), " ".join(label_tokens))[0]
    except ValueError:  # rouge_chinese found no sentence left; not seen after strip(), but never lose the run
        return EMPTY
    bleu = lib.sentence_bleu([label_tokens], pred_tokens, smoothing_function=lib.smoothing)
    f = {name: round(rouge[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}
    return SampleScores(f["rouge-1"], f["rouge-2"], f["rouge-l"], float(bleu))


def mean_scores(samples: list[SampleScores]) -> Scores:
    import numpy as np

    if not samples:
        raise ValueError("no samples to score")

    def mean(name: str) -> float:
        return float(np.mean([getattr(s, name) for s in samples]))

    return Scores(mean("rouge_1"), mean("rouge_2"), mean("rouge_l"), mean("bleu_4"), num_samples=len(samples),
                  num_empty=sum(s.empty for s in samples))


def score(predictions: list[str], references: list[str]) -> Scores:
    """Mean ROUGE-1/2/L (0-100) and BLEU-4 (0-1) of predictions[i] against references[i]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; pass one of each "
                         "per sample")
    return mean_scores([score_sample(p, r) for p, r in zip(predictions, references)])
