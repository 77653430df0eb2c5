"""Export: adapter folders, merged 16-bit models checked against base + adapter, model cards, Hub pushes.

Covers export.py (what is exported, staging, the CLI), merge.py (the merge and its log-prob check), hub.py (the
upload) and modelcard.py (the card), through the export that uses them all. Each name is used from the module
that defines it, so that a monkeypatch reaches the code that looks it up.
No network: the Hub is a fake HfApi that records its calls; base models are the tiny saved fixtures.
"""

import contextlib
import importlib
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo.cli import export as export_cli
from lora_dpo.cli.main import parser
from lora_dpo.export import hub, merge
from lora_dpo.export.pipeline import export, load_source_tokenizer
from lora_dpo.model.load import DTYPES as TORCH_DTYPES
from lora_dpo.run.source import resolve_source
from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError
from lora_dpo.model.sampling import generate
from lora_dpo.training.loop import train

PROMPTS = ["write a short review of the film night train .", "what is the capital of France?", "is it good ?"]


def write_pairs(path, n=16):
    rows = [{"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
             "rejected": f"no it is bad {i % 5}"} for i in range(n)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama):
    """A finished run: 3 DPO steps on the tiny Llama loaded in 4-bit NF4 (the real case: the base that
    trained the adapter is quantized, the base it is merged into is not)."""
    root = tmp_path_factory.mktemp("export-run")
    data = write_pairs(root / "pairs.jsonl")
    recipe = load_recipe(None, [
        f"output_dir={root / 'run'}", f"model.name={tiny_llama}", f"data.train={data}", "data.max_length=32",
        "data.eval_fraction=0.25", "lora.r=4", "lora.dropout=0.0", "train.batch_size=4", "train.lr=1e-2",
        "train.max_steps=3", "train.warmup_ratio=0", "eval.batch_size=4",
    ])  # fmt: skip
    assert recipe.model.quantization == "nf4"
    train(recipe)
    return root / "run"


def base_plus_adapter(base, adapter, dtype=torch.float32):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(adapter)).eval()


def no_partial_left(out: Path) -> bool:
    return not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())


# ------------------------------------------------------------------------------------------------ adapter


def test_adapter_export_of_a_trained_run_has_adapter_tokenizer_and_card_and_loads_with_peft(
    trained_run, tiny_llama, tmp_path
):
    out = tmp_path / "exp"
    result = export(trained_run, out)
    names = {name for name, _ in result.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "lora_dpo_recipe.yaml"} <= names  # fmt: skip
    assert result.kind == "adapter" and no_partial_left(out)
    # the adapter is the run's, bit for bit, and peft loads it onto the base
    exported = load_file(out / "adapter_model.safetensors")
    trained = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    model = base_plus_adapter(tiny_llama, out)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)
    assert ModelCard.load(out / "README.md").data.library_name == "peft"


def test_a_checkpoint_exports_its_adapter_with_the_base_tokenizer_and_no_final_metrics(trained_run, tmp_path):
    checkpoint = sorted((trained_run / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "exp"
    export(checkpoint, out)
    assert (out / "tokenizer_config.json").is_file() and (out / "lora_dpo_recipe.yaml").is_file()
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (checkpoint / "adapter" / weights).read_bytes()
    assert "## Evaluation" not in ModelCard.load(out / "README.md").text  # eval.json is the final adapter's


def test_existing_export_is_not_replaced_unless_overwrite(strong_adapter, tiny_qwen2, tmp_path):
    out = tmp_path / "exp"
    export(strong_adapter, out, base=str(tiny_qwen2))
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        export(strong_adapter, out, base=str(tiny_qwen2))
    assert (out / "mine.txt").read_text() == "keep"
    export(strong_adapter, out, base=str(tiny_qwen2), overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "adapter_config.json").is_file()


def test_export_refuses_to_write_over_its_own_source(trained_run):
    with pytest.raises(UserError, match="would replace the source"):
        export(trained_run, trained_run, overwrite=True)
    assert (trained_run / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------------- merged


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_model_loads_with_plain_transformers_and_matches_base_plus_adapter(
    strong_adapter, tiny_qwen2, tmp_path, dtype
):
    out = tmp_path / f"merged-{dtype}"
    result = export(strong_adapter, out, base=str(tiny_qwen2), merge=True, dtype=dtype, max_shard_size="200KB")
    torch_dtype = TORCH_DTYPES[dtype]
    atol, rtol = merge.TOLERANCES[dtype]
    v = result.verification
    assert isinstance(result.max_logp_diff, float) and v.passed
    assert 0 <= result.max_logp_diff <= atol
    assert v.adapter_effect > 2 * atol and not v.blind  # a merge that lost the adapter would fail the check
    # the merge is checked in fp32, where it is exact; a bf16 export is that merge rounded once, then saved
    assert v.checked_in == "fp32" and v.max_abs_diff <= merge.TOLERANCES["fp32"][0]
    if dtype == "bf16":
        assert v.saved_dtype == "bf16" and v.reload_diff <= merge.TOLERANCES["bf16"][0]
        assert v.max_abs_diff < v.rounding <= atol  # what bf16's rounding moves, reported beside
        assert "Saved in bf16 and reloaded" in v.summary()
    files = {name for name, _ in result.files}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "README.md"} <= files and sum(f.endswith(".safetensors") for f in files) >= 2  # fmt: skip
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert ModelCard.load(out / "README.md").data.library_name == "transformers"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert merged.dtype == torch_dtype and not hasattr(merged, "peft_config")
    reference = base_plus_adapter(tiny_qwen2, strong_adapter, torch_dtype)
    tok = AutoTokenizer.from_pretrained(out)
    seqs, _ = merge.verification_sequences(resolve_source(strong_adapter, str(tiny_qwen2)), tok)
    got, want = merge.completion_logps(merged, seqs), merge.completion_logps(reference, seqs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if dtype != "fp32":  # greedy text in bf16 follows rounding: one flipped argmax changes the rest
        return
    # greedy answers: the merged model says what base + adapter says, and that is not what the base says
    greedy = dict(temperature=0, max_new_tokens=12)
    merged_text = generate(merged, tok, PROMPTS, **greedy)
    assert merged_text == generate(reference, tok, PROMPTS, **greedy)
    assert merged_text != generate(reference, tok, PROMPTS, adapter=False, **greedy)


def test_merged_export_of_a_trained_4bit_run_is_verified_on_its_held_out_pairs(trained_run, tmp_path):
    result = export(trained_run, tmp_path / "merged", merge=True, dtype="fp32")
    v = result.verification
    assert v.data == "4 held-out pairs of the run" and v.passed and v.max_abs_diff <= 1e-4
    assert v.adapter_effect > 1e-3  # three steps at lr 1e-2 moved the policy well beyond fp32 rounding
    card = ModelCard.load(result.out / "README.md")
    assert "Merge verification" in card.text and f"{v.max_abs_diff:.2e}" in card.text
    assert "qlora" in card.data.tags and "4-bit NF4" in card.text


def test_verification_falls_back_to_fixed_prompts_when_the_runs_data_is_gone(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["data"]["train"] = str(tmp_path / "moved.jsonl")
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    src = resolve_source(run)
    said = []
    seqs, what = merge.verification_sequences(src, load_source_tokenizer(src), log=said.append)
    assert what == f"{len(merge.FIXED_PAIRS)} fixed prompts and replies" and len(seqs) == len(merge.FIXED_PAIRS)
    assert "moved.jsonl" in said[0] and "fixed prompts" in said[0]
    assert all(prompt and completion for prompt, completion in seqs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verification_catches_a_merge_that_lost_the_adapter_and_writes_nothing(
    strong_adapter, tiny_qwen2, tmp_path, monkeypatch, dtype
):
    monkeypatch.setattr(merge, "merge_adapter", lambda model: model.unload())  # drops the adapter, merges nothing
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="merge verification failed") as err:
        export(strong_adapter, out, base=str(tiny_qwen2), merge=True, dtype=dtype)
    assert "Nothing was written" in str(err.value)
    assert not out.exists() and no_partial_left(out)


def test_a_base_too_large_for_fp32_is_checked_in_the_export_dtype(strong_adapter, tiny_qwen2, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "_free_memory", lambda device: 1000)  # bytes: no fp32 copy fits
    said = []
    result = export(strong_adapter, tmp_path / "merged", base=str(tiny_qwen2), merge=True, dtype="bf16", log=said.append)
    v = result.verification
    assert v.passed and v.checked_in == "bf16" and v.saved_dtype is None and v.max_abs_diff <= merge.TOLERANCES["bf16"][0]
    assert any("checked in bf16" in line and "--tolerance" in line for line in said)


def test_merge_refuses_a_prequantized_base_checkpoint(strong_adapter, tiny_qwen2, tmp_path):
    base = tmp_path / "tiny-bnb-4bit"
    base.mkdir()
    config = json.loads((Path(tiny_qwen2) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="already quantized.*bitsandbytes.*rounds the adapter's update"):
        export(strong_adapter, out, base=str(base), merge=True)
    assert not out.exists() and no_partial_left(out)
    export(strong_adapter, tmp_path / "adapter-only", base=str(base))  # the adapter alone is fine


def test_merge_refuses_a_model_with_4bit_layers(tiny_llama):
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    n = sum(isinstance(m, Linear4bit) for m in peft.modules())
    with pytest.raises(UserError, match=f"{n} bitsandbytes Linear4bit layers.*4-bit grid"):
        merge.merge_adapter(peft)


def test_merge_states_its_needs_and_refuses_when_the_disk_is_too_small(
    strong_adapter, tiny_qwen2, tmp_path, monkeypatch
):
    # parameters of the tiny Qwen2 worked out by hand: embeddings and head V*64 each; per layer q 64*64 + 64,
    # k and v 64*32 + 32 each (2 heads of 16, with biases), o 64*64, MLP 3*64*128, two norms 64; final norm 64
    vocab = AutoModelForCausalLM.from_pretrained(tiny_qwen2).config.vocab_size
    params = 2 * vocab * 64 + 2 * (4096 + 64 + 2 * (2048 + 32) + 4096 + 3 * 8192 + 128) + 64
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    said = []
    out = tmp_path / "sub" / "merged"
    with pytest.raises(UserError, match=r"not enough disk space.*needs about [\d.]+ MB in .*1\.0 kB free"):
        export(strong_adapter, out, base=str(tiny_qwen2), merge=True, dtype="bf16", log=said.append)
    assert f"{params / 1e6:.1f} M parameters" in said[0] and "bf16" in said[0] and "RAM" in said[0]
    assert not (tmp_path / "sub").exists()  # nothing written, not even the parent folder


# ------------------------------------------------------------------------------------------------- card


def test_model_card_parses_with_metadata_eval_metrics_and_plot(trained_run, tiny_llama, tmp_path):
    # the base as a Hugging Face cache snapshot (its folder names the Hub id) with a licence in its README
    base = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tiny_llama, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["model"]["name"], recipe["data"]["train"] = str(base), "tiny-org/preference-pairs"
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    (run / "plots").mkdir(exist_ok=True)  # the trainer draws the curves; stand-ins where it did not
    for name in ("kl.png", "loss.png"):
        if not (run / "plots" / name).exists():
            (run / "plots" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())

    out = tmp_path / "exp"
    export(run, out)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny-org/tiny-llama"
    assert card.data.library_name == "peft"
    assert {"dpo", "lora", "lora-dpo"} <= set(card.data.tags)
    assert card.data.datasets == ["tiny-org/preference-pairs"]
    assert card.data.license == "apache-2.0"
    final = json.loads((run / "eval.json").read_text())
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        assert f"| `{key}` | " in card.text and f"{final[key]:.4g}" in card.text
    shown = "overview.png" if (run / "plots" / "overview.png").exists() else "loss.png"
    assert f"![training curves](plots/{shown})" in card.text and "[kl](plots/kl.png)" in card.text
    for png in (run / "plots").glob("*.png"):
        assert (out / "plots" / png.name).read_bytes() == png.read_bytes()
    assert "PeftModel.from_pretrained" in card.text and "tiny-org/tiny-llama" in card.text
    # others load the adapter by the Hub id, not by a path on this machine
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"


def test_a_finished_runs_adapter_folder_has_the_real_card_with_the_runs_metrics(trained_run):
    """adapter/README.md is the card an export writes, not peft's template: the run's final evaluation against
    the reference, its recipe and curves beside it, so the folder can be shared (uploaded) as it is."""
    adapter = trained_run / "adapter"
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora-dpo" in card.data.tags and "qlora" in card.data.tags
    assert "\n# run\n" in card.text  # headed by the run directory's name
    assert "More information needed" not in card.text  # peft's blank template's filler
    final = json.loads((trained_run / "eval.json").read_text())
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        assert f"| `{key}` | " in card.text and f"{final[key]:.4g}" in card.text
    assert (adapter / "lora_dpo_recipe.yaml").read_bytes() == (trained_run / "config.yaml").read_bytes()
    for png in (trained_run / "plots").glob("*.png"):
        assert (adapter / "plots" / png.name).read_bytes() == png.read_bytes()
    assert f'PeftModel.from_pretrained(base, "{adapter}")' in card.text
    # a checkpoint's adapter keeps peft's own files: its metrics are not final
    checkpoint = sorted((trained_run / "checkpoints").glob("step-*"))[-1] / "adapter"
    assert not (checkpoint / "lora_dpo_recipe.yaml").exists()


def test_local_base_without_hub_id_gets_no_base_model_unless_named(strong_adapter, tiny_qwen2, tmp_path):
    export(strong_adapter, tmp_path / "a", base=str(tiny_qwen2))
    assert ModelCard.load(tmp_path / "a" / "README.md").data.base_model is None  # the Hub rejects a path there
    export(strong_adapter, tmp_path / "b", base=str(tiny_qwen2), base_id="Qwen/Qwen2.5-0.5B")
    assert ModelCard.load(tmp_path / "b" / "README.md").data.base_model == "Qwen/Qwen2.5-0.5B"


# -------------------------------------------------------------------------------------------------- Hub


class FakeApi:
    """Records the HfApi calls push makes; `fail` raises an exception from the named method."""

    def __init__(self, fail=None, error=None, public=False):
        self.calls, self.fail, self.error, self.public = [], fail, error, public

    def _record(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        if method == self.fail:
            raise self.error

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        self._record("repo_info", repo_id, **kwargs)
        return SimpleNamespace(private=not self.public)

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)


@pytest.fixture
def exported(strong_adapter, tiny_qwen2, tmp_path):
    return export(strong_adapter, tmp_path / "exp", base=str(tiny_qwen2)).out


@pytest.fixture
def fake_hub(monkeypatch):
    """Every HfApi that push builds is this fake; `tokens` holds the tokens it was built with."""
    api = FakeApi()
    api.tokens = []
    monkeypatch.setattr(hub, "HF_API_FACTORY", lambda token: (api.tokens.append(token), api)[1])
    return api


def cli(argv):
    """`lora-dpo export ...` as the command line parses it, run in this process (UserError propagates)."""
    return export_cli.run(parser().parse_args(argv))


def test_the_hub_api_factory_is_only_replaceable_where_push_looks_it_up():
    # a copy in export.py could be replaced, but push would ignore it and call the real Hub
    assert export_cli.push is hub.push and not hasattr(export_cli, "HF_API_FACTORY")


def test_push_creates_the_repo_private_and_uploads_the_folder_to_the_branch(exported, fake_hub):
    result = hub.push(exported, "alice/tiny-dpo", private=True, revision="v1")
    methods = [c[0] for c in fake_hub.calls]
    assert methods == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    _, args, kwargs = fake_hub.calls[0]
    assert args == ("alice/tiny-dpo",) and kwargs == dict(private=True, exist_ok=True, repo_type="model")
    assert fake_hub.calls[2][2]["branch"] == "v1"
    upload = fake_hub.calls[3][2]
    assert (upload["folder_path"], upload["repo_id"], upload["revision"]) == (str(exported), "alice/tiny-dpo", "v1")
    assert fake_hub.tokens == [None]  # no token given: huggingface_hub finds HF_TOKEN or the saved login
    assert result.url == "https://huggingface.co/alice/tiny-dpo" and not result.dry_run


def test_cli_dry_run_lists_files_and_sizes_and_calls_nothing(strong_adapter, tiny_qwen2, tmp_path, fake_hub, capsys):
    out = tmp_path / "exp"
    assert cli(["export", str(strong_adapter), "--out", str(out), "--base", str(tiny_qwen2),
                "--push-to-hub", "alice/tiny-dpo", "--private", "--dry-run"]) == 0  # fmt: skip
    assert fake_hub.calls == [] and fake_hub.tokens == []
    printed = capsys.readouterr().out
    assert "dry run: would upload" in printed and "alice/tiny-dpo (private)" in printed
    size = (out / "adapter_model.safetensors").stat().st_size
    assert re.search(rf"adapter_model\.safetensors +{size / 1e3:.1f} kB", printed)
    assert "README.md" in printed and "nothing was sent" in printed


def http_module():
    """The HTTP client huggingface_hub uses (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    raise ImportError("neither httpx2 nor httpx is installed")


def network_errors():
    http = http_module()
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    return {
        "connect": http.ConnectError("[Errno 111] Connection refused", request=request),
        "http-503": HfHubHTTPError("503 Service Unavailable", response=http.Response(503, request=request)),
        "oserror": ConnectionError("Network is unreachable"),  # requests' ConnectionError is an OSError too
    }


@pytest.mark.parametrize("kind", ["connect", "http-503", "oserror"])
def test_network_failure_is_one_clear_message_and_keeps_the_export(exported, fake_hub, kind):
    before = hub.list_files(exported)
    fake_hub.fail, fake_hub.error = "upload_folder", network_errors()[kind]
    with pytest.raises(UserError, match=r"could not push to the Hugging Face Hub \(alice/tiny-dpo\).*complete and "
                                         r"unchanged.*hf upload alice/tiny-dpo"):
        hub.push(exported, "alice/tiny-dpo")
    assert hub.list_files(exported) == before


def test_token_never_appears_in_output_messages_or_export(exported, fake_hub, capsys):
    secret = "hf_SECRET123"
    http = http_module()
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    fake_hub.fail = "create_repo"
    response = http.Response(401, request=request)
    fake_hub.error = HfHubHTTPError(f"401 Unauthorized: invalid token {secret}", response=response)
    with pytest.raises(UserError) as err:
        hub.push(exported, "alice/tiny-dpo", token=secret)
    message = str(err.value)
    assert secret not in message and "hf auth login" in message
    fake_hub.fail = None
    print(hub.push(exported, "alice/tiny-dpo", token=secret).listing())
    assert fake_hub.tokens == [secret, secret]  # it did reach the HfApi
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    assert not any(secret.encode() in f.read_bytes() for f in exported.rglob("*") if f.is_file())


def test_private_push_into_an_existing_public_repo_is_refused_before_upload(exported, fake_hub):
    fake_hub.public = True
    with pytest.raises(UserError, match="already exists and is public"):
        hub.push(exported, "alice/tiny-dpo", private=True)
    assert "upload_folder" not in [c[0] for c in fake_hub.calls]


# ----------------------------------------------------------------------------------------- bad inputs, CLI


def test_folder_that_is_neither_run_nor_adapter_is_refused_naming_it(tmp_path):
    folder = tmp_path / "holiday-photos"
    folder.mkdir()
    with pytest.raises(UserError, match=f"{folder}: neither a run directory .* nor an adapter folder"):
        export(folder, tmp_path / "exp")
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: x\n")
    with pytest.raises(UserError, match="without a finished adapter"):
        export(run, tmp_path / "exp")
    with pytest.raises(UserError, match="no such run directory"):
        export(tmp_path / "missing", tmp_path / "exp")


@pytest.mark.parametrize("repo", ["tiny-dpo", "alice/", "alice/tiny/dpo", "alice/tiny dpo"])
def test_push_to_hub_needs_owner_slash_name(strong_adapter, tmp_path, repo, fake_hub):
    out = tmp_path / "exp"
    with pytest.raises(UserError, match="--push-to-hub"):
        cli(["export", str(strong_adapter), "--out", str(out), "--push-to-hub", repo])
    assert not out.exists() and fake_hub.calls == []  # refused before any work


@pytest.mark.parametrize("flags, named", [(["--dtype", "fp16"], "--dtype"), (["--dry-run"], "--dry-run"),
                                          (["--private"], "--private")])  # fmt: skip
def test_options_that_need_another_option_are_refused(strong_adapter, tmp_path, flags, named):
    with pytest.raises(UserError, match=f"{named}: only with"):
        cli(["export", str(strong_adapter), "--out", str(tmp_path / "exp"), *flags])


def test_cli_export_subcommand_returns_0_and_prints_where(strong_adapter, tiny_qwen2, tmp_path, fake_hub, capsys):
    out = tmp_path / "exp"
    assert cli(["export", str(strong_adapter), "--out", str(out), "--base", str(tiny_qwen2),
                "--push-to-hub", "alice/tiny-dpo", "--revision", "v1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"exported the adapter to {out}" in printed and "uploaded" in printed
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_branch", "upload_folder"]


# ------------------------------------------------------------------------------------------------- GGUF
# The conversion itself runs on a real model in tests/test_real_model.py (llama.cpp's converter knows SmolLM2's
# tokenizer, not the tiny test tokenizers); here: what is refused before anything heavy starts, a converter that
# fails, and what is taken of llama.cpp's tree.


def _cli_export(*args) -> int:
    from lora_dpo.cli.main import main

    return main(["export", *map(str, args)])


def test_gguf_flags_that_cannot_work_exit_2_before_anything_loads(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    assert _cli_export(trained_run, "--out", out, "--llama-cpp", tmp_path) == 2
    assert "--llama-cpp: only with --gguf TYPE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: q4_k_m is llama-quantize's, not the converter's
        _cli_export(trained_run, "--out", out, "--gguf", "q4_k_m")
    assert "invalid choice: 'q4_k_m'" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece"
                        else real_find_spec(name, *a))
    assert _cli_export(trained_run, "--out", out, "--gguf", "bf16") == 2
    err = capsys.readouterr().err
    assert "--gguf: needs sentencepiece" in err and "pip install 'lora-dpo[gguf]'" in err
    monkeypatch.undo()
    assert _cli_export(trained_run, "--out", out, "--gguf", "bf16", "--llama-cpp", tmp_path) == 2
    assert f"--llama-cpp {tmp_path}: no convert_hf_to_gguf.py there" in capsys.readouterr().err
    assert not out.exists()


def test_a_converter_that_fails_is_one_message_and_leaves_no_export(trained_run, tmp_path, capsys):
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('INFO:hf-to-gguf:Loading model: merged')\n"
        "raise NotImplementedError('BPE pre-tokenizer was not recognized - update get_vocab_base_pre()')\n")
    out = tmp_path / "exp"
    assert _cli_export(trained_run, "--out", out, "--gguf", "f32", "--llama-cpp", fake) == 2
    err = capsys.readouterr().err
    assert ("llama.cpp's converter could not convert the merged model to GGUF: NotImplementedError: BPE "
            "pre-tokenizer was not recognized") in err and "Traceback" not in err.split("lora-dpo: error:")[-1]
    assert not out.exists() and no_partial_left(out)


def test_the_converter_is_taken_from_the_llama_cpp_python_source_with_only_what_it_needs(tmp_path, monkeypatch):
    import io
    import tarfile

    from lora_dpo.export import gguf

    root = f"llama_cpp_python-{gguf.CONVERTER.version}/vendor/llama.cpp/"
    archive = tmp_path / "sdist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py", "LICENSE",
                     "src/llama.cpp", "ggml/src/ggml.c", "../../setup.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    @contextlib.contextmanager
    def fake_download(pinned, purpose):
        assert pinned == gguf.CONVERTER and not pinned.wheel
        yield archive

    monkeypatch.setattr(gguf, "downloaded", fake_download)
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path / "cache"))
    folder = gguf.converter()
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == ["LICENSE", "conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert folder == tmp_path / "cache" / "llama.cpp" / f"llama-cpp-python-{gguf.CONVERTER.version}"
    assert gguf.converter() == folder  # once: the second call finds it
