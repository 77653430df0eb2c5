"""The Chat tab in a real headless Chromium: a short toy run, trained beforehand, answers the same messages with its
adapter on and off (greedy decoding), streamed into the conversation; the two models must answer differently."""

import os

import pytest

from lora_dpo.config import load_recipe
from lora_dpo.training.loop import train
from lora_dpo_app import tour
from lora_dpo_app.workspace import Workspace
from tiny import REPO

pytestmark = pytest.mark.browser

if tour.chromium_path() is None and not os.environ.get("LORA_DPO_REQUIRE_BROWSER"):
    pytest.skip("needs a Chromium (apt-get install chromium); CI installs it and sets LORA_DPO_REQUIRE_BROWSER",
                allow_module_level=True)

TOY = REPO / "recipes" / "toy.yaml"
PROMPTS = tour.TOY_PROMPTS.splitlines()


def chat(page, message: str) -> str:
    """Clear the conversation, send `message`, wait for the reply to finish; return the reply's text."""
    page.locator("#chat-clear").click()
    page.wait_for_function("!document.querySelector('#chat [data-testid=bot]') && "
                           "!document.querySelector('#chat-note').innerText.trim()", timeout=30_000)
    page.locator("#chat-message textarea").fill(message)
    page.locator("#chat-send").click()
    page.wait_for_selector("#chat-note:has-text('answered by')", timeout=120_000)
    replies = page.locator("#chat [data-testid=bot]").all_inner_texts()
    assert len(replies) == 1, replies
    return replies[0].strip()


def test_chat_answers_with_the_adapter_on_and_off_and_the_answers_differ(tmp_path):
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - the dev extra: after the skip above

    ws = Workspace.at(tmp_path)
    # 30 steps (a few seconds): greedy answers differ from the reference's from about 15 steps on
    train(load_recipe(TOY, [f"output_dir={ws.runs / 'chat'}", "train.max_steps=30", "train.eval_every=null",
                            "train.save_every=null", "eval.num_prompts=8", "eval.max_pairs=32"]))
    demo, url = tour.launch(ws)
    try:
        with sync_playwright() as p:
            browser = tour.browser(p)
            page = browser.new_page(viewport={"width": 1360, "height": 1200})
            page.goto(url)
            page.get_by_role("tab", name="Chat").click()
            page.wait_for_function("document.querySelector('#chat-adapter input')?.value === 'runs/chat'",
                                   timeout=30_000)
            temperature = page.locator("#chat-temperature input[type=number]")
            temperature.fill("0")  # greedy: the same message always gets the same answer
            temperature.press("Enter")
            answers = {}
            for adapter in (True, False):
                if page.locator("#chat-adapter-on input").is_checked() != adapter:
                    page.locator("#chat-adapter-on input").click()
                for prompt in PROMPTS:
                    answers[adapter, prompt] = chat(page, prompt)
                    who = "tuned (adapter on)" if adapter else "reference (adapter off)"
                    assert who in page.locator("#chat-note").inner_text()
            assert all(answers.values()), answers
            # greedy: the same answer twice (what differs below is the adapter, not chance)
            assert chat(page, PROMPTS[0]) == answers[False, PROMPTS[0]]
            assert any(answers[True, p] != answers[False, p] for p in PROMPTS), answers
            browser.close()
    finally:
        demo.jobs.shutdown(timeout=30)
        demo.close()
