"""`glmkit generate`: complete one prompt and stream the text to standard output as it is produced (a raw prompt,
or with --chat one user message in the model's chat format). Knows the LLM API; nothing of the engine."""

from __future__ import annotations

import sys

from .args import add_model_arguments, add_sampling_arguments, load_llm, sampling_params


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.0, top_p=1.0, max_tokens=256)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message in the chat format")


def read_prompt(text: str) -> str:
    if text != "-":
        return text
    # Bytes, decoded leniently: a stray byte the locale's encoding cannot decode becomes U+FFFD instead of a
    # UnicodeDecodeError, and the rest of the prompt still reaches the model.
    return sys.stdin.buffer.read().decode(sys.stdin.encoding or "utf-8", errors="replace")


def main(args) -> int:
    prompt = read_prompt(args.prompt)  # before loading: a prompt that never comes should not cost a load
    llm = load_llm(args, max_num_seqs=1)
    params = sampling_params(args)
    out = sys.stdout
    if not args.chat:
        for text, _ in llm.stream(prompt, params):
            out.write(text)
            out.flush()
        out.write("\n")
        return 0
    messages = [{"role": "user", "content": prompt}]
    output_ids: list[int] = []
    for text, delta in llm.stream_chat(messages, params):
        output_ids += delta.token_ids
        out.write(text)
        out.flush()
    out.write("\n")
    # Tool calls never show in the streamed text; the one final parse finds them.
    parsed = llm.chat_serving.parse(llm.chat_serving.render(messages), output_ids)
    for call in parsed.tool_calls:
        out.write(f"[tool call] {call.name}({call.arguments})\n")
    return 0
