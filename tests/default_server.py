"""What the client tests ask the shared default-model server (the `server` fixture in conftest.py)."""

from __future__ import annotations

import re

MODEL = "qwen2.5-coder-0.5b-instruct"
ALIAS = "chatglm3-6b"
EMBEDDING_MODEL = "all-minilm-l6-v2"
ARITHMETIC = "What is 2+3? Reply with just the number."
COLORS = "Name three colors, separated by commas."
WEATHER_EN = "What's the weather like in Beijing today?"
WEATHER_ZH = "北京今天天气怎么样？"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                   "required": ["city"]}}}
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
