"""ROUGE-1/2/L and BLEU-4 as ChatGLM3's finetune_demo computes them: checked against the libraries called the
demo's way, by hand on small cases, and on what the demo crashes on (an empty prediction or reference)."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

from glmkit.finetune import metrics  # noqa: E402
from glmkit.finetune.metrics import MissingDependencyError, Scores, score, score_sample  # noqa: E402

PAIRS = [  # (prediction, reference)
    ("这款连衣裙采用优质面料，穿着舒适透气。", "这款连衣裙面料柔软，穿起来很舒适。"),
    ("简约的圆领设计，修饰脸型，展现优雅气质。", "圆领的设计简约大方，很好地修饰了脸型，尽显女性的优雅。"),
    ("宽松的版型\n遮肉显瘦", "宽松版型，遮肉又显瘦，百搭时尚"),
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
    ("Loose fit, hides the belly.", "A loose fit that hides the belly and looks slim."),
]


def official(predictions, references) -> dict:
    """ChatGLM3 finetune_demo/finetune_hf.py compute_metrics, on texts instead of token ids."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    metrics_dct = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred_txt, label_txt in zip(predictions, references):
        pred_tokens = list(jieba.cut(pred_txt.strip()))
        label_tokens = list(jieba.cut(label_txt.strip()))
        scores = Rouge().get_scores(" ".join(pred_tokens), " ".join(label_tokens))
        for k, v in scores[0].items():
            metrics_dct[k].append(round(v["f"] * 100, 4))
        metrics_dct["bleu-4"].append(
            sentence_bleu([label_tokens], pred_tokens, smoothing_function=SmoothingFunction().method3))
    return {k: np.mean(v) for k, v in metrics_dct.items()}


def as_demo(scores: Scores) -> dict:
    return {k: scores.as_dict()[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}


@pytest.mark.parametrize("pair", PAIRS, ids=range(len(PAIRS)))
def test_each_pair_matches_the_official_computation(pair):
    got = score([pair[0]], [pair[1]])
    assert as_demo(got) == official([pair[0]], [pair[1]])
    assert (got.num_samples, got.num_empty) == (1, 0)


def test_means_over_samples_match_the_official_computation():
    predictions, references = zip(*PAIRS)
    assert as_demo(score(list(predictions), list(references))) == pytest.approx(official(predictions, references))


def test_identical_texts_score_100_rouge_and_bleu_1():
    text = "这款连衣裙采用优质面料，穿着舒适透气。"
    got = score([text, "a loose fit that hides the belly"], [text, "a loose fit that hides the belly"])
    assert (got.rouge_1, got.rouge_2, got.rouge_l) == (100.0, 100.0, 100.0)
    assert got.bleu_4 == pytest.approx(1.0)  # the demo's scale: a fraction, not x100


def test_disjoint_texts_score_0():
    # jieba: 今天天气|很|好 and 我|喜欢|吃|苹果: no word in common (English would share its space tokens)
    got = score(["今天天气很好"], ["我喜欢吃苹果"])
    assert (got.rouge_1, got.rouge_2, got.rouge_l, got.bleu_4) == (0.0, 0.0, 0.0, 0.0)


def test_hand_checked_partial_overlap():
    # jieba: 这|款|连衣裙|采用|优质|面料|，|穿着|舒适|透气|。 vs 这|款|连衣裙|面料|柔软|，|穿|起来|很|舒适|。
    # 11 words each, 7 shared -> ROUGE-1 F = 7/11; 10 bigrams each, 2 shared (这款, 款连衣裙) -> ROUGE-2 F = 2/10.
    got = score_sample(*PAIRS[0])
    assert got.rouge_1 == round(7 / 11 * 100, 4) == 63.6364
    assert got.rouge_2 == 20.0


@pytest.mark.parametrize("prediction,reference", [("", "参考答案"), ("  \n", "参考答案"), ("预测", ""), ("", "")])
def test_empty_prediction_or_reference_scores_0_and_is_counted(prediction, reference):
    # What the official code raises on (rouge_chinese: "Hypothesis is empty." / "Reference is empty.")
    with pytest.raises(ValueError):
        official([prediction], [reference])
    text = "这款连衣裙采用优质面料，穿着舒适透气。"
    got = score([prediction, text], [reference, text])
    assert (got.num_samples, got.num_empty) == (2, 1)
    assert (got.rouge_1, got.rouge_2, got.rouge_l) == (50.0, 50.0, 50.0)  # the empty one counts as 0
    assert got.bleu_4 == pytest.approx(0.5)
    assert score_sample(prediction, reference).empty


def test_mismatched_lengths_and_no_samples_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        score([], [])


def test_jieba_banner_is_silenced():
    code = "from glmkit.finetune.metrics import score; print(score(['你好世界'], ['你好世界']).rouge_1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "100.0"
    assert proc.stderr == ""


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # None in sys.modules: `import` raises ImportError
    metrics._libraries.cache_clear()
    try:
        with pytest.raises(MissingDependencyError) as info:
            metrics.require()
        assert "pip install 'glmkit[finetune]'" in str(info.value) and "rouge_chinese" in str(info.value)
    finally:
        metrics._libraries.cache_clear()
