"""Gradio streaming chat, laid out like the seed's web demo.

    instructglm web --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca --port 7860
    instructglm serve ... --web true      # the same page at /web/ beside the OpenAI API, one loaded model

Answers stream into the chat as they are generated, prompted in the model family's format with the
run's template (`instructglm.infer.prompts.Prompter`); the conversation so far is the history of
the next question (kept as messages, so a ChatGLM3 or GLM-4 tool call stays one); "Clear History" starts over; the Maximum length, Top P and Temperature
sliders set the decoding of each answer (temperature 0 decodes greedily; Maximum length counts
prompt and answer, and never runs past the model's context). The app binds 127.0.0.1 unless
`--host` says otherwise and never creates a public share link.

Answers come from the batching engine (`instructglm.infer.engine`): up to `--max_batch_size`
visitors are answered together, sharing each forward pass, and the rest queue. With `serve
--web` the page and the API share one engine, so their requests batch together too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from instructglm.errors import BadValue
from instructglm.infer.generate import EngineArguments, GenerationArguments
from instructglm.infer.load import ModelArguments, load_from_args

TITLE = "InstructGLM: Streaming Chatbot with Gradio"


def check_port(port: int) -> None:
    """A TCP port: 1..65535, or 0 for any free one (the server logs the one it got); web's and serve's `--port`.

    Raises:
        BadValue: outside 0..65535.
    """
    if not 0 <= port <= 65535:
        raise BadValue(f"--port {port} is not a TCP port; give 1..65535, or 0 for any free port")


@dataclass
class WebArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes the app to the network."})
    port: int = field(default=7860, metadata={"help": "TCP port."})

    def __post_init__(self):
        check_port(self.port)


ARGUMENTS = (ModelArguments, WebArguments, EngineArguments, GenerationArguments)


def build_app(engine: Any, prompter: Any, defaults: GenerationArguments | None = None):
    """The Gradio Blocks app over a running `BatchEngine` (not launched); `prompter` is the loaded model's
    `instructglm.infer.prompts.Prompter`. The history state is the conversation as message dicts."""
    import gradio as gr

    from instructglm.data.messages import Message
    from instructglm.infer.engine import GenerationFailed, QueueFull, stream_answer
    from instructglm.infer.prompts import reply_text

    defaults = defaults or GenerationArguments()

    def respond(query: str, messages: list, history: list, max_length: float, top_p: float, temperature: float) -> Iterator:
        query = (query or "").strip()
        if not query:
            yield messages, history, ""
            return
        settings = GenerationArguments(
            max_length=int(max_length), top_p=float(top_p), temperature=float(temperature), do_sample=float(temperature) > 0
        )
        messages = list(messages or []) + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        answer = ""
        asked = [*(history or []), {"role": "user", "content": query}]
        yield messages, history, ""
        try:
            stream = stream_answer(engine, prompter, [Message.from_dict(m) for m in asked], settings)
            for piece in stream:
                answer += piece
                messages[-1] = {"role": "assistant", "content": answer}
                yield messages, history, ""
        except BadValue as err:  # prompt longer than Maximum length
            raise gr.Error(str(err)) from None
        except QueueFull:
            raise gr.Error("the server is busy: too many requests waiting; try again shortly") from None
        except GenerationFailed as err:
            raise gr.Error(str(err)) from None
        messages[-1] = {"role": "assistant", "content": reply_text(stream.message)}
        yield messages, asked + [stream.message.to_dict()], ""

    def clear() -> tuple:
        return [], [], ""

    with gr.Blocks(title="InstructGLM", analytics_enabled=False) as app:
        gr.HTML(f'<h1 align="center">{TITLE}</h1>')
        chatbot = gr.Chatbot(label="InstructGLM", elem_id="chatbot", height=480)
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=4):
                query = gr.Textbox(show_label=False, placeholder="Input...", lines=3, elem_id="query")
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column(scale=1):
                clear_button = gr.Button("Clear History", elem_id="clear")
                max_length = gr.Slider(1, 4096, value=defaults.max_length, step=1, label="Maximum length", interactive=True)
                top_p = gr.Slider(0, 1, value=defaults.top_p, step=0.01, label="Top P", interactive=True)
                temperature = gr.Slider(0, 1, value=defaults.temperature, step=0.01, label="Temperature", interactive=True)
        inputs = [query, chatbot, history, max_length, top_p, temperature]
        outputs = [chatbot, history, query]
        # As many visitors at once as the engine batches; the rest wait in Gradio's queue.
        submit.click(respond, inputs, outputs, concurrency_limit=engine.max_batch_size, concurrency_id="chat")
        query.submit(respond, inputs, outputs, concurrency_limit=engine.max_batch_size, concurrency_id="chat")
        clear_button.click(clear, None, outputs)
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the app; with `block=False` return at once (tests), close it with `app.close()`."""
    app.queue(max_size=64)
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block, quiet=not block)


def main(model_args: ModelArguments, args: WebArguments, engine_args: EngineArguments, defaults: GenerationArguments) -> int:
    from instructglm.infer.engine import BatchEngine

    model, tokenizer, prompter = load_from_args(model_args)
    engine = BatchEngine(model, tokenizer, max_batch_size=engine_args.max_batch_size, decode=engine_args.decode, stop_ids=prompter.stop_ids)
    engine.start()
    try:
        launch(build_app(engine, prompter, defaults), args.host, args.port)
    finally:
        engine.stop()
    return 0
