"""The rest of the API PEFT's own tests call on every case, side by side with PEFT 0.21.2 on PEFT's test MLP:
load_adapter's load result, from_pretrained(device_map=…), PeftModel.modules_to_save, the model card that
save_pretrained writes (merged into a user's README), push_to_hub (through a local fake of huggingface_hub's
upload calls), and no lorakit-only field in adapter_config.json."""

import copy
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import mlp_input, peft_test_mlp


def saved_mlp(folder, **kw):
    model = lorakit.get_peft_model(peft_test_mlp(), lorakit.LoraConfig(
        target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False, **kw))
    model.save_pretrained(folder)
    return model


def test_peft_loads_a_lorakit_adapter_without_warnings(tmp_path, caplog):
    import peft

    source = saved_mlp(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(peft_test_mlp(), tmp_path)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "lorakit" in m or "Unexpected keyword" in m], messages
    with torch.no_grad():
        torch.testing.assert_close(loaded(mlp_input()), source.eval()(mlp_input()), rtol=0, atol=0)


def test_load_adapter_returns_the_load_result_as_peft(tmp_path):
    import peft

    saved_mlp(tmp_path)
    results = []
    for lib in (lorakit, peft):
        model = lib.PeftModel.from_pretrained(peft_test_mlp(), tmp_path)
        results.append((model.load_adapter(tmp_path, "other"), model.load_adapter(tmp_path, "other")))
    for (ours, theirs) in zip(*results):
        assert ours.missing_keys == theirs.missing_keys == []
        assert ours.unexpected_keys == theirs.unexpected_keys == []


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "cpu", "auto"])
def test_from_pretrained_takes_a_device_map(tmp_path, device_map):
    import peft

    saved_mlp(tmp_path)
    outputs = []
    for lib in (lorakit, peft):
        model = lib.PeftModel.from_pretrained(peft_test_mlp(), tmp_path, device_map=device_map)
        assert all(p.device.type == "cpu" for p in model.parameters())
        with torch.no_grad():
            outputs.append(model(mlp_input()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with pytest.raises(TypeError, match="device_map"):
        lorakit.PeftModel.from_pretrained(peft_test_mlp(), tmp_path, device_map=["cpu"])


def test_modules_to_save_property_as_peft():
    import peft

    for lib in (lorakit, peft):
        model = lib.get_peft_model(peft_test_mlp(), lib.LoraConfig(target_modules=["lin0"]))
        assert model.modules_to_save is None
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        assert model.modules_to_save == {"lin1"}


# ----------------------------------------------------------------------------------------------------------------
# the model card
# ----------------------------------------------------------------------------------------------------------------
def front_matter(text):
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_model_card(tmp_path):
    import peft

    model = lorakit.get_peft_model(peft_test_mlp(), lorakit.LoraConfig(
        r=4, lora_alpha=12, target_modules=["lin0"], base_model_name_or_path="org/mlp"))
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/mlp" and "lora" in meta["tags"]
    assert "| default | `.` | 4 | 12 |" in text and "| other | `other` | 2 | 8 |" in text and "`lin1`" in text
    assert f"lorakit {lorakit.__version__}" in text
    assert not (tmp_path / "other" / "README.md").exists()  # one card, at the top, as PEFT writes it
    peft.PeftModel.from_pretrained(peft_test_mlp(), tmp_path)  # the card changes nothing for loading


def test_a_users_readme_is_merged_not_overwritten(tmp_path):
    user = "---\nlicense: mit\ntags:\n- mine\nbase_model: me/original\n---\n# My adapter\n\nTrained on my data.\n"
    (tmp_path / "README.md").write_text(user)
    model = saved_mlp(tmp_path, base_model_name_or_path="org/mlp")
    model.save_pretrained(tmp_path)  # a second save rewrites lorakit's section, once
    text = (tmp_path / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "mit" and meta["tags"] == ["mine", "lora"] and meta["library_name"] == "peft"
    assert meta["base_model"] == "me/original"  # the user's value is kept
    assert "# My adapter\n\nTrained on my data.\n" in text
    assert text.count("## Adapter settings") == 1 and text.count("| default |") == 1


def test_a_readme_that_cannot_be_merged_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_bytes(b"\xff\xfe not utf-8")
    with pytest.warns(UserWarning, match="not UTF-8"):
        saved_mlp(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == b"\xff\xfe not utf-8"
    assert (tmp_path / "adapter_model.safetensors").is_file()
    broken = "---\nlicense: [mit\n---\nText.\n"  # front matter that is not valid YAML: kept as it is
    (tmp_path / "README.md").write_text(broken)
    saved_mlp(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(broken) and "## Adapter settings" in text


# ----------------------------------------------------------------------------------------------------------------
# push_to_hub, with a local fake of huggingface_hub's calls
# ----------------------------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: repos are folders under ``root``; records the calls."""

    def __init__(self, root: Path, fail: bool = False):
        self.root, self.fail, self.calls = root, fail, []

    def __call__(self, token=None):
        self.calls.append(("HfApi", token))
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        if self.fail:
            raise OSError("Network is unreachable")
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def hf_hub_download(self, repo_id, filename, revision=None):
        from huggingface_hub.errors import EntryNotFoundError

        path = self.root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def upload_folder(self, repo_id, folder_path, commit_message, commit_description=None, revision=None,
                      create_pr=False):
        self.calls.append(("upload_folder", repo_id, commit_message, sorted(p.name for p in Path(folder_path).iterdir())))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"commit to {repo_id}"


def test_push_to_hub_uploads_what_peft_loads(tmp_path, monkeypatch):
    import huggingface_hub
    import peft

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    (tmp_path / "hub" / "me" / "mlp").mkdir(parents=True)
    (tmp_path / "hub" / "me" / "mlp" / "README.md").write_text("# Mine\n\nKeep this.\n")
    model = lorakit.get_peft_model(peft_test_mlp(), lorakit.LoraConfig(target_modules=["lin0"],
                                                                       init_lora_weights=False))
    assert model.push_to_hub("me/mlp", commit_message="first", token="t0k") == "commit to me/mlp"
    assert hub.calls[0] == ("HfApi", "t0k")
    assert hub.calls[-1] == ("upload_folder", "me/mlp", "first",
                             ["README.md", "adapter_config.json", "adapter_model.safetensors"])
    remote = tmp_path / "hub" / "me" / "mlp"
    assert "Keep this." in (remote / "README.md").read_text() and "## Adapter settings" in (remote / "README.md").read_text()
    loaded = peft.PeftModel.from_pretrained(peft_test_mlp(), remote)
    with torch.no_grad():
        torch.testing.assert_close(loaded(mlp_input()), model.eval()(mlp_input()), rtol=0, atol=0)


def test_push_to_hub_offline_or_unreachable_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    model = lorakit.get_peft_model(peft_test_mlp(), lorakit.LoraConfig(target_modules=["lin0"]))
    hub = FakeHub(tmp_path / "hub", fail=True)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    with pytest.raises(ConnectionError, match="could not create or reach Hub repo 'me/mlp'.*Network is unreachable"):
        model.push_to_hub("me/mlp")
    assert not any(c[0] == "upload_folder" for c in hub.calls)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline mode"):
        model.push_to_hub("me/mlp")
