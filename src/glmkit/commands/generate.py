"""`glmkit generate`: complete one raw prompt (no chat format) and print the text, streaming."""

from __future__ import annotations

import sys

from .args import add_model_arguments, add_sampling_arguments, load_llm, sampling_params


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.0, top_p=1.0, max_tokens=256)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message in the chat format")


def main(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args, max_num_seqs=1)
    params = sampling_params(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        print(out.text)
        for call in out.tool_calls:
            print(f"[tool call] {call.name}({call.arguments})")
        return 0
    out = llm.generate([prompt], params)[0]
    print(out.text)
    return 0
