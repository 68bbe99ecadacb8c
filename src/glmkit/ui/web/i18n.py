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
    "mode_knowledge": ("Knowledge", "知识库"),
    "knowledge": ("Knowledge base", "知识库"),
    "kb": ("Answer from", "回答依据"),
    "kb_new": ("New knowledge base", "新建知识库"),
    "kb_new_placeholder": ("a name, e.g. manuals", "名称，例如 manuals"),
    "kb_create": ("Create", "创建"),
    "kb_upload": ("Add files (.md .txt .pdf .docx .html)", "添加文件（.md .txt .pdf .docx .html）"),
    "kb_files": ("Its files", "其中的文件"),
    "kb_remove": ("Remove the chosen file", "移除选中的文件"),
    "kb_delete": ("Delete knowledge base", "删除知识库"),
    "kb_delete_yes": ("Yes, delete it and all its files", "确定删除它及其全部文件"),
    "kb_delete_no": ("Cancel", "取消"),
}

# Lines the page writes at run time (a status line, a warning), in the page's language: `message` picks it.
MESSAGES = {
    "kb_none": ("Choose or create a knowledge base first (the Knowledge base panel above the chat).",
                "请先选择或创建一个知识库（对话上方的知识库面板）。"),
    "kb_no_name": ("Type a name for the new knowledge base.", "请输入新知识库的名称。"),
    "kb_no_file": ("Choose a file in the list first.", "请先在列表中选择一个文件。"),
    "kb_created": ("Created {name}: add files to it.", "已创建 {name}，请添加文件。"),
    "kb_deleted": ("Deleted {name}.", "已删除 {name}。"),
    "kb_removed": ("Removed {file}.", "已移除 {file}。"),
    "kb_added": ("{file}: {chunks} passages", "{file}：{chunks} 段"),
    "kb_unchanged": ("{file}: unchanged", "{file}：未变化"),
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


def page_language(fixed: str | None, accept_language: str | None) -> str:
    """The page's language for run-time lines: `--language`, else the browser's first choice (zh or en)."""
    if fixed in ("en", "zh"):
        return fixed
    return "zh" if (accept_language or "").strip().lower().startswith("zh") else "en"


def message(key: str, language: str, **values) -> str:
    """A run-time line in `language` ("en" or "zh"), `values` filled in."""
    en, zh = MESSAGES[key]
    return (zh if language == "zh" else en).format(**values)
