"""Drafter model definitions. Each head-style kind is a PretrainedConfig + PreTrainedModel pair registered with
the Auto classes; draft LMs are ordinary causal LMs (drafters/draft_lm.py). `load_drafter(path)` restores any of
them, and save/push come from transformers (and peft for LoRA adapters)."""
import json
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .draft_lm import check_complete, check_draft_vocab, load_draft_lm
from .dflash import DFlashConfig, DFlashModel
from .eagle import EagleConfig, EagleModel
from .kinds import KINDS, kind_of_model_type
from .medusa import MedusaConfig, MedusaModel
from .zoo import is_zoo_folder, load_zoo_drafter

for _kind in KINDS.values():
    if _kind.model is not None:
        AutoConfig.register(_kind.model.config_class.model_type, _kind.model.config_class, exist_ok=True)
        AutoModel.register(_kind.model.config_class, _kind.model, exist_ok=True)


def load_drafter(path: str, target: PreTrainedModel | None = None, **kwargs) -> PreTrainedModel:
    """Load a saved drafter: Medusa heads, an EAGLE drafter, or a draft LM (full weights or LoRA adapters), or a
    zoo folder (drafters/zoo.py: it needs `target`). With `target`, check that it fits (hidden size / vocabulary) and
    attach it. A damaged or incomplete folder is a ValueError saying so."""
    folder = Path(path) if Path(path).is_dir() else _download(path)
    if is_zoo_folder(folder):
        return load_zoo_drafter(folder, target)
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} has neither config.json nor adapter_config.json: not a saved drafter")
    with _readable(path):
        drafter = _read(folder, **kwargs)
    if target is None:
        return drafter
    if hasattr(drafter, "attach_target"):
        drafter.attach_target(target)
    else:  # a draft LM (or a PeftModel around one)
        check_draft_vocab(getattr(drafter, "get_base_model", lambda: drafter)().config, target.config)
    return drafter


def _read(folder: Path, **kwargs) -> PreTrainedModel:
    if (folder / "adapter_config.json").is_file():
        return load_draft_lm(folder, **kwargs)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind_of_model_type(model_type) == "draft_lm":
        return load_draft_lm(folder, **kwargs)  # any causal LM sharing the target's vocabulary
    drafter, info = AutoModel.from_pretrained(folder, output_loading_info=True, **kwargs)
    check_complete(info, folder)
    return drafter.eval()


@contextmanager
def _readable(path: str):
    """A folder whose files do not parse (cut short, overwritten, half-copied) is a one-line error naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"drafter {path} cannot be read ({type(err).__name__}: {reason}); save it again (train or "
                         "export it), or give another drafter folder") from err


def _download(repo_id: str) -> Path:
    """A Hub repository's files (cached by huggingface_hub), for drafters given by repo id."""
    from huggingface_hub import snapshot_download

    if Path(repo_id).exists():
        raise NotADirectoryError(f"drafter {repo_id!r} is a file; give the drafter folder (<output_dir>/drafter)")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # invalid id, no network, no such repo: say what was tried
        raise FileNotFoundError(f"drafter {repo_id!r} is neither a local folder nor a Hub repository reachable from "
                                f"here ({type(err).__name__}: {err})") from err
