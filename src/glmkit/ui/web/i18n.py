"""The page's labels in English and Chinese: Gradio picks the browser's language; `--language` fixes one."""

from __future__ import annotations

LABELS = {
    "new": ("New conversation", "新对话"),
    "conversations": ("Conversations", "对话"),
    "title": ("Title", "标题"),
    "rename": ("Rename", "重命名"),
    "delete": ("Delete", "删除"),
    "export_json": ("Export JSON", "导出 JSON"),
    "export_md": ("Export Markdown", "导出 Markdown"),
    "export": ("Export", "导出"),
    "mode": ("Mode", "模式"),
    "mode_chat": ("Chat", "对话"),
    "mode_tools": ("Tools", "工具"),
    "mode_code": ("Code Interpreter", "代码解释器"),
    "mode_character": ("Character", "角色扮演"),
    "character": ("Character profile", "角色设定"),
    "bot_name": ("Character's name", "角色名"),
    "bot_info": ("Character's persona", "角色设定"),
    "user_name": ("Your name", "用户名"),
    "user_info": ("About you", "用户设定"),
    "greeting": ("Greeting", "开场白"),
    "message": ("Message", "消息"),
    "placeholder": ("Type a message, Enter to send", "输入消息，回车发送"),
    "send": ("Send", "发送"),
    "stop": ("Stop", "停止"),
    "clear": ("Clear", "清空"),
    "model": ("Model", "模型"),
    "system": ("System prompt", "系统提示词"),
    "max_tokens": ("Max tokens", "最大输出长度"),
    "temperature": ("Temperature", "温度"),
    "top_p": ("Top p", "Top p"),
    "settings": ("Settings", "设置"),
}


def translations(language: str | None = None) -> dict[str, dict[str, str]]:
    """{locale: {key: label}} for gr.I18n; with `language` ("en" or "zh") every locale gets that one."""
    en = {key: pair[0] for key, pair in LABELS.items()}
    zh = {key: pair[1] for key, pair in LABELS.items()}
    if language == "en":
        zh = en
    elif language == "zh":
        en = zh
    return {"en": en, "zh": zh, "zh-CN": zh}
