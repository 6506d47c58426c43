"""The Gradio page of ``kubetune ui``: the only module of the package that imports gradio (an optional extra,
``pip install kubetune[ui]``), and only when the page is built.

Layout: model checkboxes (ticking loads, unticking frees), an example picker filling schema, question and gold,
the "Ask" button, the answers side by side, and a memory panel that refreshes on a timer. Loading runs in one
queue slot; asking has SHARED_WORKERS slots of its own: the model pool's lock makes a question wait for a load
(never a half-loaded pool) and questions take turns to generate, but judging the answers' SQL runs in sandbox
workers outside the lock, so one user's hostile schema or gold query never holds up another user.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.sqlsandbox import SHARED_WORKERS
from kubetune.ui import views
from kubetune.ui.backend import Example, ModelPool, ask
from kubetune.ui.memory import gpu_memory, process_rss_bytes
from kubetune.ui.settings import Bind

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # memory panel refresh: often enough to watch a load, cheap (NVML reads, no torch call)
_MODELS_SLOT = "models"  # concurrency id of loading: one load at a time
_ASK_SLOTS = "ask"  # concurrency id of asking: as many at once as the sandbox pool has workers


def memory_panel(pool: ModelPool) -> str:
    return views.memory_html(gpu_memory(), pool.loaded(), pool.info.labels, process_rss_bytes())


def _status(pool: ModelPool) -> str:
    names = pool.names()
    if not names:
        return views.message_html("no model loaded: tick one or more models above")
    return views.message_html("loaded: " + ", ".join(pool.info.labels[n] for n in names))


def build(pool: ModelPool, examples: list[Example], refresh_s: float = REFRESH_S):
    import gradio as gr

    info = pool.info
    by_title = {e.title: e for e in examples}

    def select(names: list[str]):
        try:
            pool.select(list(names or []))
            status = _status(pool)
        except Exception as exc:  # a model that cannot load (missing files, out of memory): say so, keep going
            log.exception("loading %s failed", names)
            status = views.message_html(f"could not load {', '.join(names)}: {exc}", error=True)
        # The checkboxes show what is really loaded, also after a failure.
        return gr.update(value=pool.names()), status, memory_panel(pool)

    def pick(title: str | None):
        e = by_title.get(title or "")
        if e is None:
            return gr.update(), gr.update(), gr.update()
        return e.context, e.question, e.gold

    def run(context: str, question: str, gold: str):
        try:
            result = ask(pool, context or "", question or "", gold or "")
        except ValueError as exc:  # no question, no model: the user's to fix
            return views.message_html(str(exc), error=True), memory_panel(pool)
        return views.comparison_html(result), memory_panel(pool)

    with gr.Blocks(title=f"kubetune · {info.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## kubetune · run `{info.name}`\nModels of `{info.layout.run_dir}`: tick to load (unticked "
                    "models are freed), pick an example or type a schema and a question, then ask.")
        with gr.Row():
            with gr.Column(scale=3):
                models = gr.CheckboxGroup(choices=[(info.labels[m], m) for m in info.models], value=[],
                                          label="Models", elem_id="kt-models")
                status = gr.HTML(_status(pool), elem_id="kt-status")
                example = gr.Dropdown(choices=list(by_title), value=None, label="Example from the evaluation split",
                                      elem_id="kt-example", interactive=True)
                context = gr.Textbox(label="Schema (CREATE TABLE statements)", lines=3, elem_id="kt-context")
                question = gr.Textbox(label="Question", lines=1, elem_id="kt-question")
                gold = gr.Textbox(label="Gold SQL (optional: gives pass/fail)", lines=1, elem_id="kt-gold")
                go = gr.Button("Ask the models", variant="primary", elem_id="kt-ask")
            with gr.Column(scale=2):
                gr.Markdown("### Memory")
                memory = gr.HTML(memory_panel(pool), elem_id="kt-memory-panel")
        answers = gr.HTML("", elem_id="kt-answers-panel")

        models.input(select, models, [models, status, memory], concurrency_id=_MODELS_SLOT, concurrency_limit=1)
        example.input(pick, example, [context, question, gold])
        go.click(run, [context, question, gold], [answers, memory], concurrency_id=_ASK_SLOTS,
                 concurrency_limit=SHARED_WORKERS, api_name="ask")
        timer = gr.Timer(refresh_s)
        timer.tick(lambda: memory_panel(pool), None, memory, show_progress="hidden")
    return app


def launch(pool: ModelPool, examples: list[Example], bind: Bind, auth: tuple[str, str] | None = None,
           block: bool = True, refresh_s: float = REFRESH_S) -> Any:
    """Serve the page on ``bind``; ``block`` False returns the running app (call ``.close()``), for tests."""
    app = build(pool, examples, refresh_s)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=bind.host, server_port=bind.port, auth=auth, share=False,  # never a public link
               prevent_thread_lock=not block, ssr_mode=False, show_error=True, quiet=not block,
               css=views.CSS, mcp_server=False, pwa=False, inbrowser=False)
    return app
