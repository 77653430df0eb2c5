"""The app in a real headless Chromium: click Start in the Train tab and see the plot draw while training
runs, then see both panes filled in Compare and the export done (lora_dpo_app.tour takes the steps)."""

import os

import pytest
import yaml

from lora_dpo_app import tour
from lora_dpo_app.workspace import Workspace
from tiny import REPO

pytestmark = pytest.mark.browser

if tour.chromium_path() is None and not os.environ.get("LORA_DPO_REQUIRE_BROWSER"):
    pytest.skip("needs a Chromium (apt-get install chromium); CI installs it and sets LORA_DPO_REQUIRE_BROWSER",
                allow_module_level=True)

TOY = REPO / "recipes" / "toy.yaml"


def test_click_start_see_plot_update_then_compare_and_export(tmp_path):
    from playwright.sync_api import sync_playwright

    recipe = yaml.safe_load(open(TOY))
    recipe["output_dir"] = "runs/browser"
    recipe["train"].update(max_steps=12, eval_every=6, save_every=None)
    recipe["eval"].update(num_prompts=8, max_pairs=32)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "toy.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    demo, url = tour.launch(Workspace.at(tmp_path))
    try:
        with sync_playwright() as p:
            browser = tour.browser(p)
            page = browser.new_page(viewport={"width": 1360, "height": 1200})
            page.goto(url)
            seen = tour.train(page)
            assert seen["state"] == "finished"
            assert seen["loss_lines"] == 1  # the loss plot draws the training series
            assert "step 12 of 12" in page.locator("#job-state").inner_text()
            assert "finished" in page.locator("#outcome").inner_text()
            left, right = tour.compare(page)
            assert left.strip() and right.strip()
            assert "reward" in page.locator("#pane-left").inner_text() + page.locator("#pane-right").inner_text()
            assert "exported" in tour.export(page)
            assert (tmp_path / "exports" / "browser" / "adapter_model.safetensors").is_file()
            browser.close()
    finally:
        demo.jobs.shutdown(timeout=30)
        demo.close()


def test_stop_reload_resume_with_the_runs_own_settings_and_no_token_left_in_the_browser(tmp_path, monkeypatch):
    """A run started with a beta the recipe does not have is stopped, the page reloaded, resumed by ticking
    resume alone (the form fills from the run's config.yaml), and finishes; the recipe list offers no accelerate
    config; a Hub token typed into Export is nowhere in the page, its run history, or the browser's profile."""
    from playwright.sync_api import sync_playwright

    from lora_dpo_app import export_tab

    class Pushed:
        def listing(self):
            return "would upload 5 files"

    monkeypatch.setattr(export_tab, "push", lambda folder, repo_id, **kw: Pushed())  # no Hub here
    recipe = yaml.safe_load(open(TOY))
    recipe["output_dir"] = "runs/beta"
    recipe["train"].update(max_steps=60, eval_every=None, save_every=None)
    recipe["eval"].update(num_prompts=4, max_pairs=16)
    (tmp_path / "recipes" / "accelerate").mkdir(parents=True)
    (tmp_path / "recipes" / "toy.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (tmp_path / "recipes" / "accelerate" / "ddp.yaml").write_text(
        (REPO / "recipes" / "accelerate" / "ddp.yaml").read_text())
    secret = "hf_BROWSERsecret0123456789"
    demo, url = tour.launch(Workspace.at(tmp_path))
    profile = tmp_path / "profile"
    try:
        with sync_playwright() as p:
            context = tour.persistent_context(p, profile)
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#command:has-text('lora-dpo train')", timeout=60_000)
            options = tour.dropdown_options(page, "recipe")
            assert options == ["recipes/toy.yaml"]
            assert "recipes/accelerate/ddp.yaml" in page.locator("#not-recipes").inner_text()

            tour.set_number(page, "#field-loss-beta", "0.2")
            page.wait_for_selector("#command:has-text('loss.beta=0.2')", timeout=30_000)
            page.locator("#start").click()
            # the phases show from the first second, read from the trainer's progress.json
            page.wait_for_selector("#phase-list li[data-phase='loading the model']", timeout=600_000)
            page.wait_for_selector("#phase-current[data-phase='training'][data-state='running']", timeout=600_000)
            page.wait_for_function("Number(document.querySelector('#job-state').dataset.step) >= 2", timeout=600_000)
            seen = page.locator("#phase-list li").evaluate_all("items => items.map(li => li.dataset.phase)")
            assert {"tokenising data", "loading the model", "reference pass", "evaluating the reference",
                    "sampling the reference", "training"} <= set(seen), seen
            page.locator("#stop").click()
            page.wait_for_selector("#job-state[data-state='stopped']", timeout=300_000)

            page.reload()
            page.wait_for_selector("#command:has-text('lora-dpo train')", timeout=60_000)
            page.locator("#field-resume input[type=checkbox]").check()
            page.wait_for_selector("#run-note:has-text('resume')", timeout=30_000)
            assert tour.number(page, "#field-loss-beta") == "0.2"  # the run's beta, not the recipe's 0.1
            assert page.locator("#field-loss-beta input").is_disabled()  # a resume may not change it
            page.wait_for_selector("#command:has-text('runs/beta/config.yaml resume=true')", timeout=30_000)
            page.locator("#start").click()
            page.wait_for_selector("#job-state[data-state='finished'], #job-state[data-state='failed']",
                                   timeout=900_000)
            assert page.locator("#job-state").get_attribute("data-state") == "finished", page.locator("#log").inner_text()
            assert "step 60 of 60" in page.locator("#job-state").inner_text()
            seen = page.locator("#phase-list li").evaluate_all("items => items.map(li => li.dataset.phase)")
            assert {"evaluation", "saving a checkpoint", "saving the adapter"} <= set(seen), seen

            page.get_by_role("tab", name="Export").click()
            page.wait_for_function("document.querySelector('#export-run input').value.length > 0", timeout=30_000)
            page.locator("#export-run input").fill("runs/beta")
            page.get_by_label("push to the Hugging Face Hub").check()
            page.get_by_label("repository (owner/name)").fill("alice/toy-dpo")
            page.locator("#token input").fill(secret)
            page.locator("#export").click()
            page.wait_for_selector("#export-result:has-text('exported')", timeout=300_000)
            assert page.locator("#token input").input_value() == ""
            page.reload()
            page.wait_for_selector("#command:has-text('lora-dpo train')", timeout=60_000)
            stored = page.evaluate("JSON.stringify(Object.assign({}, window.localStorage)) + "
                                   "JSON.stringify(Object.assign({}, window.sessionStorage))")
            assert secret not in stored and secret not in page.content()
            runs_page = context.new_page()
            runs_page.goto(url.rstrip("/") + "/gradio_api/runs")
            assert secret not in runs_page.content()
            context.close()
        leaked = [f for f in profile.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
        assert not leaked, leaked
    finally:
        demo.jobs.shutdown(timeout=30)
        demo.close()
