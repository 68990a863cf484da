"""Publishing a drafter: the exact folder that would be uploaded (files, model card with the eval table), and the
upload call it gets. The Hub is unreachable here: only HfApi's two network methods are replaced."""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from transformers import AutoConfig

from tiny_assets import write_tiny_assets
from train import push
from train.config import load_config
from train.train_heads import run

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "medusa_tiny.yaml")


class FakeHub:
    """Stands in for the Hub at the network boundary and records what each call received."""

    def __init__(self, monkeypatch):
        self.created, self.uploads = [], []
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        folder = Path(folder_path)
        self.uploads.append({"folder": folder, "repo_id": repo_id, "files": sorted(p.name for p in folder.iterdir()),
                             "card": (folder / push.CARD).read_text(), **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run with evaluation and push.repo_id set: returns (output_dir, the fake hub's record)."""
    root = tmp_path_factory.mktemp("push")
    assets = write_tiny_assets(root / "assets")
    out = root / "run"
    overrides = [f"{k}={v}" for k, v in assets.items()] + [
        f"output_dir={out}", "data.limit=null", "data.max_length=128", "data.max_tokens=512", "training.max_steps=1",
        "checkpoint.every_steps=null", "eval.limit=2", "eval.max_new_tokens=8", "eval.tree=chain",
        "eval.check_lossless=true", "logging.progress_bar=false", "push.repo_id=someone/tiny-medusa",
        "push.private=true"]
    with pytest.MonkeyPatch.context() as mp:
        hub = FakeHub(mp)
        run(load_config(TINY, overrides))
    return out, hub


def test_training_with_push_repo_id_uploads_the_drafter_folder(trained):
    out, hub = trained
    assert hub.created == [{"repo_id": "someone/tiny-medusa", "repo_type": "model", "private": True, "exist_ok": True}]
    (upload,) = hub.uploads
    assert upload["folder"] == out / "drafter" and upload["repo_id"] == "someone/tiny-medusa"
    assert upload["create_pr"] is False
    assert upload["files"] == ["README.md", "config.json", "eval.json", "model.safetensors"]
    assert "| **overall** |" in upload["card"]


def test_dry_run_folder_and_card(trained, tmp_path, monkeypatch):
    out, _ = trained
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("a dry run must not upload"))
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("a dry run must not create a repo"))
    dry = tmp_path / "dry"
    push.main(["--drafter", str(out / "drafter"), "--repo-id", "someone/tiny-medusa", "--eval",
               str(out / "eval.json"), "--dry-run", str(dry)])
    assert sorted(p.name for p in dry.iterdir()) == ["README.md", "config.json", "eval.json", "model.safetensors"]
    card = (dry / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "draftsmith"
    assert {"speculative-decoding", "medusa", "draftsmith"} <= set(meta["tags"])
    assert "base_model" not in meta  # the target was a local directory: no machine-local path in a public card
    assert str(tmp_path.parent) not in card and str(out.parent) not in card

    report = json.loads((out / "eval.json").read_text())
    rows = [*report["per_category"].items(), ("**overall**", report["overall"])]
    assert len(report["per_category"]) == 2
    for name, r in rows:
        assert (f"| {name} | {r['tau']:.2f} | {r['speedup']:.2f}x | {r['tokens_per_s']:.1f} | "
                f"{r['baseline_tokens_per_s']:.1f} |") in body
    lossless = report["lossless"]
    assert f"Lossless check: {lossless['mismatches']} of {lossless['checked']} answers" in body
    assert f"target dtype {report['setup']['dtype']}" in body and f"device {report['setup']['device']}" in body
    assert "load_drafter('someone/tiny-medusa', target)" in body
    assert "Held-out top-1 accuracy per head" in body


@pytest.mark.parametrize("recorded, base_model", [
    ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("/home/someone/models/target", None),
])
def test_base_model_is_the_recorded_target_id(trained, tmp_path, recorded, base_model):
    out, _ = trained
    folder = tmp_path / "drafter"
    shutil.copytree(out / "drafter", folder)
    config = AutoConfig.from_pretrained(folder)
    config.draftsmith = {**config.draftsmith, "target_name_or_path": recorded}  # the provenance record
    config.save_pretrained(folder)
    card = push.model_card(str(folder), "someone/x", report=None)
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta.get("base_model") == base_model
    assert "No evaluation report was given" in card
    if base_model:  # the snippet loads the very target the heads were trained on
        assert f"load_target({recorded!r})" in card


def test_cli_push_makes_one_upload_of_the_folder(trained, tmp_path, monkeypatch):
    out, _ = trained
    folder = tmp_path / "drafter"
    shutil.copytree(out / "drafter", folder, ignore=shutil.ignore_patterns("README.md", "eval.json"))
    hub = FakeHub(monkeypatch)
    push.main(["--drafter", str(folder), "--repo-id", "someone/plain"])
    assert hub.created == [{"repo_id": "someone/plain", "repo_type": "model", "private": False, "exist_ok": True}]
    (upload,) = hub.uploads
    assert upload["folder"] == folder and upload["files"] == ["README.md", "config.json", "model.safetensors"]


def test_not_a_drafter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json: give the drafter folder"):
        push.push_drafter(str(tmp_path), "someone/x", dry_run_dir=str(tmp_path / "out"))
