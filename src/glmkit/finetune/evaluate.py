"""Evaluation on a dev set: answer every conversation's last turn with the model, then score the answers against
the references with ROUGE-1/2/L and BLEU-4 (metrics.py, ChatGLM3 finetune_demo's formulas).

For each conversation the prompt is every message before its LAST assistant message, and the reference is that
message's content. A prompt goes through the same chat-serving layer as `LLM.chat` (render with the
conversation's tools, the format's stop ids, the final parse), so a prediction is exactly the text a user of
`glmkit chat` or the API would see for that conversation; greedy by default, as the demo's evaluation
(`predict_with_generate` with transformers' default do_sample=False).

Batching: the prompts go to the continuous-batching engine together, in `llm.generate` calls of `chunk_size`
prompts (default: 4 x the engine's max_num_seqs, so its batch stays full except while each chunk drains). A
dev set up to that size is one call; a larger one is several, and the progress bar advances per chunk: the
LLM API has no per-request progress hook, and stepping the engine from here would duplicate its request loop.

Differences from the demo, on purpose: one sample per conversation (the demo scores every assistant turn of a
multi-turn record), prompts are not truncated (the demo cuts them to max_input_length tokens; here a prompt
that does not fit is an error naming its line), and a reference that is a tool call with no text scores 0
(counted as empty). Knows the LLM API, the chat-serving layer and the metrics; nothing of files or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..engine.sampling_params import SamplingParams
from ..errors import GlmkitError
from . import metrics
from .data import DataError
from .metrics import SampleScores, Scores

CHUNKS_PER_BATCH = 4  # prompts per generate call = this x max_num_seqs


@dataclass
class EvalSample:
    """One conversation, split for evaluation."""
    messages: list[dict]           # every message before the last assistant message
    tools: list[dict] | None
    reference: str                 # the last assistant message's content
    source: str                    # "file:line"
    character: dict | None = None  # CharacterGLM profile


@dataclass
class Answer:
    text: str                      # the parsed content, as a user sees it
    num_output_tokens: int
    finish_reason: str | None


@dataclass
class EvalRow:
    """One sample's result (a line of `glmkit eval --output`)."""
    source: str
    prompt: str                    # the prompt's last user message
    reference: str
    prediction: str
    scores: SampleScores
    num_output_tokens: int
    finish_reason: str | None

    def as_dict(self) -> dict:
        return {"source": self.source, "prompt": self.prompt, "reference": self.reference,
                "prediction": self.prediction, **self.scores.as_dict(), "num_output_tokens": self.num_output_tokens,
                "finish_reason": self.finish_reason}


def eval_sample(conversation) -> EvalSample:
    """A Conversation (finetune/data.py: .messages, .tools, .source) -> prompt messages and reference."""
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(conversation.source, "conversations", "has no assistant turn to score against; end each "
                        "dev-set conversation with the expected answer")
    content = messages[last].get("content")
    return EvalSample(messages[:last], conversation.tools, content if isinstance(content, str) else "",
                      conversation.source, getattr(conversation, "character", None))


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content") if isinstance(message.get("content"), str) else ""
    return ""


def _requests(llm, samples: list[EvalSample], params: SamplingParams):
    """(ChatPrompt, SamplingParams) per sample, as LLM.chat builds them; a failure names the sample's line."""
    serving, limit = llm.chat_serving, llm.engine.max_model_len
    prompts, sampling = [], []
    for sample in samples:
        try:
            prompt = serving.render(sample.messages, sample.tools, sample.character)
            sampling.append(serving.sampling_params(params, prompt, limit))
        except GlmkitError as e:
            raise DataError(sample.source, "conversations", f"cannot be evaluated: {e}") from e
        prompts.append(prompt)
    return prompts, sampling


def generate_answers(llm, samples: list[EvalSample], max_new_tokens: int = 512, *,
                     params: SamplingParams | None = None, chunk_size: int | None = None,
                     progress: bool = True) -> list[Answer]:
    """Every sample's answer, batched through the engine. `params` (default: greedy) get max_tokens =
    max_new_tokens unless they set their own."""
    from tqdm import tqdm

    if params is None:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    elif params.max_tokens is None:
        params = replace(params, max_tokens=max_new_tokens)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (prompts per generate call)")
    prompts, sampling = _requests(llm, samples, params)
    chunk_size = chunk_size or CHUNKS_PER_BATCH * llm.config.max_num_seqs
    answers: list[Answer] = []
    # disable=None: a bar on a terminal only, so logs and pipes get no carriage-return noise
    with tqdm(total=len(samples), desc="evaluating", unit="sample", disable=None if progress else True) as bar:
        for start in range(0, len(prompts), chunk_size):
            chunk = prompts[start:start + chunk_size]
            outputs = llm.generate([p.prompt_ids for p in chunk], sampling[start:start + chunk_size])
            for prompt, out in zip(chunk, outputs):
                text = llm.chat_serving.parse(prompt, out.token_ids).content
                answers.append(Answer(text, len(out.token_ids), out.finish_reason))
            bar.update(len(chunk))
    return answers


def score_answers(samples: list[EvalSample], answers: list[Answer]) -> tuple[Scores, list[EvalRow]]:
    rows = [EvalRow(s.source, _last_user_text(s.messages), s.reference, a.text,
                    metrics.score_sample(a.text, s.reference), a.num_output_tokens, a.finish_reason)
            for s, a in zip(samples, answers)]
    return metrics.mean_scores([row.scores for row in rows]), rows


def evaluate(llm, conversations, max_new_tokens: int = 512, *, params: SamplingParams | None = None,
             chunk_size: int | None = None, progress: bool = True) -> tuple[Scores, list[EvalRow]]:
    """Answer each conversation's last assistant turn and score it: (mean scores, one row per conversation)."""
    metrics.require()  # before generating: a missing package should cost seconds, not the whole run
    samples = [eval_sample(c) for c in conversations]
    if not samples:
        raise ValueError("no conversations to evaluate")
    answers = generate_answers(llm, samples, max_new_tokens, params=params, chunk_size=chunk_size,
                               progress=progress)
    return score_answers(samples, answers)
