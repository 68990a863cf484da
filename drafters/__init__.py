"""Drafter model definitions. Each kind is a PretrainedConfig + PreTrainedModel pair registered with the Auto
classes, so `load_drafter(path)` restores any of them and save/push come from transformers."""
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .medusa import MedusaConfig, MedusaModel

DRAFTER_KINDS: dict[str, type[PreTrainedModel]] = {"medusa": MedusaModel}

for _model_cls in DRAFTER_KINDS.values():
    AutoConfig.register(_model_cls.config_class.model_type, _model_cls.config_class, exist_ok=True)
    AutoModel.register(_model_cls.config_class, _model_cls, exist_ok=True)


def load_drafter(path: str, target: PreTrainedModel | None = None, **kwargs) -> PreTrainedModel:
    """Load a saved drafter of any registered kind; with `target`, check that it fits (and attach it)."""
    drafter = AutoModel.from_pretrained(path, **kwargs)
    if type(drafter) not in DRAFTER_KINDS.values():
        raise ValueError(f"{path} holds a {type(drafter).__name__}, not a draftsmith drafter "
                         f"(kinds: {', '.join(DRAFTER_KINDS)})")
    if target is not None:
        drafter.attach_target(target)
    return drafter.eval()
