"""glmkit's web chat page: a Gradio client of any OpenAI-compatible server (app.py), its conversation store
(store.py), what it shows of a conversation (turns.py) and its labels (i18n.py). Needs the `web` extra."""
