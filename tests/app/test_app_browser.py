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
