"""The Chat tab: talk to a finished run's model, with its adapter on (the tuned policy) or off (the reference),
the whole conversation rendered by the model's chat template and the reply streamed token by token.

The model is the Compare tab's (`CompareTab.comparer`, which is lora_dpo.compare's `Comparer.load`): the two tabs
share one loaded base, so a consumer GPU never holds two, and one model answers at a time (the Compare tab's lock).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import gradio as gr
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from lora_dpo.compare import Comparer, Sampling
from lora_dpo.data.tokenize import encode_prompt, stop_ids
from lora_dpo.errors import UserError, first_line
from lora_dpo.model.adapters import reference_model
from lora_dpo.model.sampling import sample_ids
from lora_dpo.run import resolve_source

from .compare_tab import BARELY_MOVED, NONE, CompareTab, barely_moved
from .runs import refreshed, run_dropdown

ROLES = ("system", "user", "assistant")


def as_text(content) -> str:
    """A chat message's content as plain text: gradio hands text back as a list of {"type": "text", "text": ...}
    parts (files and components, which the model cannot read, are left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(as_text(part) for part in content)
    return ""


def conversation(history: Sequence[dict], message: str) -> list[dict]:
    """The messages the chat template renders: the chatbot's history (role and text of each turn; empty replies,
    such as one a stopped answer left, are dropped) followed by the new user `message`."""
    turns = [{"role": m["role"], "content": as_text(m.get("content"))} for m in history or [] if m.get("role") in ROLES]
    turns = [m for m in turns if m["content"].strip() or m["role"] == "user"]
    return [*turns, {"role": "user", "content": message}]


def prompt_ids(tokenizer, messages: list[dict], window: int | None, max_new_tokens: int) -> tuple[list[int], int]:
    """(token ids of the conversation as the chat template renders it, with the generation prompt; how many of
    its oldest turns were left out). Oldest turns go (a leading system message stays) until the prompt and
    `max_new_tokens` fit the model's `window` of positions, keeping at least half of it for the prompt; the
    newest user message always stays. Whole turns go, never part of one: a cut turn would garble the template."""
    budget = None if not window else max(window - max_new_tokens, window // 2)
    head = messages[:1] if messages and messages[0]["role"] == "system" and len(messages) > 1 else []
    rest, dropped = messages[len(head):], 0
    while True:
        ids = encode_prompt(tokenizer, head + rest)
        if budget is None or len(ids) <= budget or len(rest) == 1:
            return ids, dropped
        cut = 2 if len(rest) > 2 and rest[1]["role"] == "assistant" else 1  # a user turn and its reply
        rest, dropped = rest[cut:], dropped + cut


class _Cancelled(StoppingCriteria):
    """Stops generate() at its next token once `event` is set (the page cleared or closed mid-reply)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def window_of(model) -> int | None:
    """The model's number of positions (max_position_embeddings), when its config says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def stream_reply(comparer: Comparer, messages: list[dict], adapter: bool = True,
                 sampling: Sampling = Sampling()) -> Iterator[str]:
    """The assistant's reply to `messages` from the tuned model (`adapter`) or the reference (adapter off:
    `reference_model`, pi_ref as in training), yielded as it grows: the text so far after each decoded piece.

    The sampling is `sample_ids`'s (lora_dpo.model.sampling): temperature 0 decodes greedily, else temperature
    and top-p from a forked RNG seeded with `sampling.seed`, stopping at the end of the assistant's turn; so a
    one-turn conversation gets the answer the Compare tab shows. generate() runs in a thread and hands tokens to
    transformers' TextIteratorStreamer; closing this generator stops it within one token."""
    sampling.check()
    model, tokenizer = comparer.model, comparer.tokenizer
    ids, _ = prompt_ids(tokenizer, messages, window_of(model), sampling.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel, failure = threading.Event(), []

    def run():
        try:
            model.set_adapter(comparer.adapters[0].label)
            with (contextlib.nullcontext() if adapter else reference_model(model)), torch.no_grad():
                sample_ids(model, [ids], pad_id=tokenizer.pad_token_id, stop=stop_ids(tokenizer),
                           max_new_tokens=[sampling.max_new_tokens], temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=sampling.seed, batch_size=1, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        except Exception as exc:  # noqa: BLE001 - raised again below, in the caller's thread
            failure.append(exc)
            streamer.end()  # the reader waits for the end of the stream: give it one

    thread = threading.Thread(target=run, name="chat-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            if piece:
                yield text.strip()
    finally:
        cancel.set()
        thread.join()
    if failure:
        raise UserError(f"the model could not answer: {first_line(failure[0])}") from failure[0]
    yield text.strip()


class ChatTab:
    def __init__(self, compare: CompareTab):
        self.compare, self.ws = compare, compare.ws  # the Compare tab loads (and keeps) the model

    def respond(self, source, adapter_on, history, message, temperature, top_p, max_new_tokens, seed):
        """Append the user's message and stream the reply into the chat; -> (chat, textbox, note)."""
        message = (message or "").strip()
        if not message:
            raise gr.Error("type a message first", print_exception=False)
        history = history or []
        messages = conversation(history, message)
        chat = [*history, {"role": "user", "content": message}]
        sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens), int(seed))
        with self.compare.lock:  # one model in memory, one answer at a time (Compare waits too)
            try:
                comparer = self.compare.comparer(source, NONE)
                sampling.check()
                window = window_of(comparer.model)
                _, dropped = prompt_ids(comparer.tokenizer, messages, window, sampling.max_new_tokens)
            except UserError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            who = "tuned (adapter on)" if adapter_on else "reference (adapter off)"
            note = f"answering: **{who}**, base **{comparer.base}** on {comparer.device}"
            if dropped:
                note += (f"; the oldest {dropped} message(s) no longer fit the model's {window}-token "
                         "window and were left out")
            run = comparer.adapters[0].run
            if adapter_on and run and barely_moved(resolve_source(run).final or {}):
                note += f"  \n⚠ {BARELY_MOVED}"
            yield [*chat, {"role": "assistant", "content": ""}], "", note
            try:  # closed before the lock is released: a cancelled reply stops generating first
                with contextlib.closing(stream_reply(comparer, messages, bool(adapter_on), sampling)) as stream:
                    for text in stream:
                        yield [*chat, {"role": "assistant", "content": text}], "", note
            except UserError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        yield [*chat, {"role": "assistant", "content": text}], "", note.replace("answering", "answered by")

    def refresh(self, current: str | None):
        """The finished runs as choices; the newest when none is chosen."""
        return refreshed(self.ws, current)

    def build(self) -> None:
        with gr.Row():
            self.source = run_dropdown(self.ws, "a finished run, or an adapter folder", "chat-adapter")
            adapter_on = gr.Checkbox(value=True, label="adapter on (off: the reference model)",
                                     elem_id="chat-adapter-on")
        chatbot = gr.Chatbot(label="conversation", elem_id="chat", height=360, feedback_options=None)
        message = gr.Textbox(label="message (Enter sends)", elem_id="chat-message", lines=1,
                             placeholder="write a review of the night river .")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            clear = gr.Button("Clear", elem_id="chat-clear")
        note = gr.Markdown(elem_id="chat-note")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="temperature (0: greedy)",
                                    elem_id="chat-temperature")
            top_p = gr.Slider(0.05, 1, value=Sampling.top_p, step=0.05, label="top-p")
            max_new = gr.Slider(1, 1024, value=Sampling.max_new_tokens, step=1, label="max new tokens",
                                elem_id="chat-max-new")
            seed = gr.Number(value=Sampling.seed, precision=0, label="seed")

        inputs = [self.source, adapter_on, chatbot, message, temperature, top_p, max_new, seed]
        events = [send.click(self.respond, inputs, [chatbot, message, note], api_name="chat"),
                  message.submit(self.respond, inputs, [chatbot, message, note], api_visibility="private")]
        # cancelling closes the streaming generator, which stops generate() at its next token
        clear.click(lambda: ([], "", ""), None, [chatbot, message, note], cancels=events, api_visibility="private")
