"""EAGLE feature drafters: one decoder layer of the target's own architecture that drafts in feature space.

EAGLE-1 (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"): the drafter
reads the pair (f_t, x_{t+1}) -- the target's last hidden state at t (the LM head's input) and the embedding of
the token after it -- as fc(concat(e_{t+1}, f_t)) (2H -> H, with bias), runs one decoder layer (without its
input norm) and predicts the next feature f^_{t+1}; the target's frozen LM head turns it into a distribution
over x_{t+2}. Drafting further feeds f^ back in place of f.

EAGLE-3 (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time
Test"): the feature is fused from three target layers (low, mid, high) by fc (3H -> H, no bias). The decoder
layer ("midlayer") normalises the embedding (input_layernorm) and the hidden input (hidden_norm) separately and
attends over their concatenation (q/k/v take 2H inputs); its output h (before `norm`) is the hidden input of the
next draft step. Its own LM head covers a draft vocabulary of the N most frequent target tokens: `d2t[i]` is the
offset of draft id i (target id = i + d2t[i]) and `t2d` marks the target ids that have a draft id.

P-EAGLE (parallel EAGLE-3, `parallel_drafts` K > 1): depths 2..K are drafted in the same forward as depth 1. The
positions after the root's pair are placeholders: token id -1 reads the learned `mask_embedding` in place of the
unknown token, the learned feature `mask_hidden` [F] (fused by fc like the target's, as speculators and vLLM have
it: `placeholder_hidden`) stands in for the unknown feature, and they attend causally like any draft position. The
reference feeds a mask token through a trainable embedding; here the target's embedding is borrowed frozen, so the
placeholder token is a vector of its own.

Both are built from the target's config (the decoder layer, norm and rotary classes of its transformers model
family), never from a copied modeling file. The target's embedding (and, for EAGLE-1, its LM head) is borrowed
frozen through `attach_target` and not saved. Pair j (feature of position j, token of position j + 1) sits at
position id j, in training and decoding alike.
"""
from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class EagleConfig(PretrainedConfig):
    model_type = "draftsmith_eagle"

    def __init__(self, eagle_version: int = 3, target_config: dict | None = None,
                 feature_layers: list[int] | None = None, draft_vocab_size: int | None = None,
                 target_name_or_path: str | None = None, target_revision: str | None = None,
                 step_accuracy: list[float] | None = None, step_topk_accuracy: list[list[float]] | None = None,
                 parallel_drafts: int | None = None, **kwargs):
        """target_config: the target's text config as a dict (the decoder layer is built from it).
        feature_layers (EAGLE-3): target decoder layers whose OUTPUTS are fused (= transformers'
        hidden_states[i + 1]). draft_vocab_size (EAGLE-3): rows of its LM head. step_accuracy: held-out top-1
        accuracy per draft depth, written by training; step_topk_accuracy[d][i]: the share where the rank-i token
        of depth d is the target's (not cumulative; column 0 is step_accuracy), which sizes the evaluation's tree.
        parallel_drafts (EAGLE-3): K > 1 makes a P-EAGLE drafter, K depths from one forward."""
        if eagle_version == 1 and parallel_drafts and parallel_drafts > 1:
            raise ValueError(f"parallel_drafts {parallel_drafts}: P-EAGLE is built on EAGLE-3 (eagle_version=3)")
        if eagle_version == 1 and feature_layers:
            raise ValueError(f"EAGLE-1 reads the target's last hidden state; feature_layers {feature_layers} are "
                             "for EAGLE-3 (eagle_version=3)")
        self.eagle_version = eagle_version
        self.target_config = target_config or {}
        self.feature_layers = feature_layers
        self.draft_vocab_size = draft_vocab_size
        self.target_name_or_path = target_name_or_path
        self.target_revision = target_revision
        self.step_accuracy = step_accuracy
        self.step_topk_accuracy = step_topk_accuracy
        self.parallel_drafts = parallel_drafts if parallel_drafts and parallel_drafts > 1 else None
        super().__init__(**kwargs)

    @property
    def hidden(self) -> int:
        return self.target_config["hidden_size"]

    @property
    def feature_width(self) -> int:
        """Width of the target features the drafter reads: the last hidden state (EAGLE-1), or EAGLE-3's
        fused layers side by side."""
        return self.hidden * len(self.feature_layers or [None])

    @property
    def target_vocab(self) -> int:
        return self.target_config["vocab_size"]

    def layer_config(self) -> PretrainedConfig:
        """The target family's config with one layer; attention through `eagle_attention` (torch's SDPA, or the
        training-time test's block-diagonal form)."""
        config = family_layer_config(self.target_config, 1)
        config._attn_implementation = ATTENTION
        return config


def family_layer_config(target_config: dict, num_layers: int, family: str | None = None) -> PretrainedConfig:
    """The target family's config (from its config dict) with `num_layers` layers of the first layer kind, or a
    Llama config of its sizes where EAGLE cannot rewire the family's layer (`eagle_shaped`); family 'llama' or
    'qwen3': that family's layer of the target's sizes."""
    if family is not None:
        return llama_layer_config(AutoConfig.for_model(**target_config), num_layers, family)
    tc = {k: v for k, v in target_config.items() if k not in ("model_type", "num_hidden_layers")}
    if tc.get("layer_types"):  # per-layer attention kinds: the drafter's layers are of the first kind
        tc["layer_types"] = tc["layer_types"][:1] * num_layers
    if tc.get("attn_logit_softcapping") is not None:  # Gemma 2: the drafters' attention is SDPA, without soft-capping
        tc["attn_logit_softcapping"] = None
    config = AutoConfig.for_model(target_config["model_type"], **tc, num_hidden_layers=num_layers)
    return config if eagle_shaped(config) else llama_layer_config(config, num_layers)


def eagle_shaped(config: PretrainedConfig) -> bool:
    """Whether the family's decoder layer has the parts EAGLE rewires (pre-norms, separate q/k/v projections, an
    MLP) and its rotary embedding needs nothing but positions. Built on the meta device: no memory, no init."""
    layer_cls, _, rotary_cls = family_classes(config)
    with torch.device("meta"):
        layer = layer_cls(config, layer_idx=0)
    parts = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj")
    has = all(_has_module(layer, name) for name in parts)
    rotary_args = [p for p in inspect.signature(rotary_cls.forward).parameters.values()
                   if p.default is inspect.Parameter.empty and p.name not in ("self", "x", "position_ids")]
    return has and not rotary_args


def _has_module(module: nn.Module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return False
    return True


def llama_layer_config(config: PretrainedConfig, num_layers: int = 1, family: str = "llama") -> PretrainedConfig:
    """A Llama config of the target's sizes, for families whose own layer EAGLE cannot rewire (Phi-3's fused q/k/v,
    OLMo 2's post-norms, Gemma 3's per-layer-kind rotary): the layer the serving engines run anyway. family="qwen3":
    the same sizes in a Qwen3 layer (a Llama layer with per-head q/k norms: DFlash's reference layer)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in rope:  # per layer kind (Gemma 3): the full-attention layers' rotary
        rope = rope.get("full_attention") or {"rope_type": "default", "rope_theta": 10000.0}
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
    return AutoConfig.for_model(
        family, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6), hidden_act=act, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings, rope_parameters=dict(rope), num_hidden_layers=num_layers)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] through a bias-free linear `layer` in x's dtype: a module call where the dtypes agree, so that a
    packed layer serves it (an unpacked F.linear of a few rows runs on the slow MKL path)."""
    if layer.weight.dtype == x.dtype:
        return layer(x)
    return F.linear(x, layer.weight.to(x.dtype))


ATTENTION = "draftsmith_eagle"


def ttt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                  scaling: float, fused: bool | None = None, sizes: list[int] | None = None) -> torch.Tensor:
    """Attention of training-time-test step s: step s's query at anchor j sees step 0's keys through
    `attention_mask` (causal) and, of every later step's keys, only those at anchor j.
    query [B, h, m, D]; key, value [B, kv, n + n_1 + ... + n_s, D] (step 0's keys at anchors 0..n-1, then step b's
    at its n_b anchors); attention_mask [B or 1, 1, m, n] additive over step 0's keys. sizes: [n_1, ..., n_s];
    None: every step has all n anchors (m = n_b = n). With COD (Eagle3Objective) step b keeps the first n_b anchors
    of one random order, n_1 >= ... >= n_s = m, so the query's row r and row r of every later block are the same
    anchor. Returns [B, m, h, D].

    Two exact forms (tests/test_eagle.py checks outputs and gradients of both against SDPA over all keys):
    fused (default on CUDA): one SDPA over all keys with the mask [causal | diagonal x s]; its GPU kernel never
    materialises the scores: a faster and much smaller training step on an H200 (measured when it was
    introduced; see its commit).
    unfused (default elsewhere): one causal block plus s dot products a query, with materialised scores: on CPU
    the masked form would compute s + 1 blocks of scores (4x, summed over the default 7 steps)."""
    n, m = attention_mask.shape[-1], query.shape[2]
    sizes = sizes if sizes is not None else _ttt_sizes(key.shape[2] - n, m)
    if sum(sizes) != key.shape[2] - n or min(sizes, default=m) < m:
        raise ValueError(f"training-time test: step sizes {sizes} do not fit {key.shape[2] - n} later keys and "
                         f"{m} queries")
    if fused is None:
        fused = query.device.type == "cuda"
    if fused:
        return _ttt_attention_fused(query, key, value, attention_mask, scaling, sizes)
    B, h = query.shape[:2]
    kv, D = key.shape[1], key.shape[-1]
    q = query.view(B, kv, h // kv, m, D) * scaling                              # [B, kv, g, m, D]
    k0, v0 = key[:, :, None, :n], value[:, :, None, :n]                         # [B, kv, 1, n, D]
    kd = _diagonal_rows(key[:, :, n:], sizes, m)                                # [B, kv, s, m, D]
    vd = _diagonal_rows(value[:, :, n:], sizes, m)
    scores = (q @ k0.transpose(-1, -2)).add_(attention_mask.unsqueeze(2))       # [B, kv, g, m, n]
    diag = torch.einsum("bkgnd,bksnd->bkgns", q, kd)                            # [B, kv, g, m, s]
    w = torch.softmax(torch.cat([scores, diag], dim=-1).float(), dim=-1).to(query.dtype)
    out = w[..., :n] @ v0 + torch.einsum("bkgns,bksnd->bkgnd", w[..., n:], vd)  # [B, kv, g, m, D]
    return out.reshape(B, h, m, D).transpose(1, 2)


def _ttt_sizes(later: int, m: int) -> list[int]:
    """n_1..n_s without COD: every step after step 0 has the query's m anchors."""
    if later % m:
        raise ValueError(f"training-time test: {later} keys after step 0 are not whole steps of {m} anchors")
    return [m] * (later // m)


def _diagonal_rows(blocks: torch.Tensor, sizes: list[int], m: int) -> torch.Tensor:
    """blocks [B, kv, n_1 + ... + n_s, D] -> [B, kv, s, m, D]: the first m rows of every step's block."""
    if all(size == m for size in sizes):
        return blocks.unflatten(2, (-1, m))                                     # a view: no COD
    return torch.stack([b[:, :, :m] for b in blocks.split(sizes, dim=2)], dim=2)


def _ttt_attention_fused(query, key, value, attention_mask, scaling, sizes) -> torch.Tensor:
    """ttt_attention as one SDPA call over all keys (shapes there)."""
    h, m = query.shape[1], query.shape[2]
    kv = key.shape[1]
    block0 = attention_mask.to(query.dtype)                                     # [B or 1, 1, m, n]
    widest = max(sizes, default=m)  # eye(m, widest)[:, :size] is eye(m, size): one diagonal serves every step
    diagonal = torch.zeros(m, widest, dtype=query.dtype, device=query.device).masked_fill_(
        ~torch.eye(m, widest, dtype=torch.bool, device=query.device), torch.finfo(query.dtype).min)
    diagonals = [diagonal[:, :size].expand(*block0.shape[:2], m, size) for size in sizes]
    mask = torch.cat([block0, *diagonals], dim=-1)                              # [B or 1, 1, m, n + sum(sizes)]
    k, v = key.repeat_interleave(h // kv, dim=1), value.repeat_interleave(h // kv, dim=1)  # [B, h, keys, D]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)                                                  # [B, m, h, D]


def eagle_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, ttt: bool | list[int] = False, **kwargs):
    """The drafter layer's attention function (transformers' AttentionInterface): `ttt` (passed through the
    layer's kwargs by the training-time test: True, or COD's anchors per later step, ttt_attention's `sizes`) takes
    `ttt_attention`, anything else torch's SDPA."""
    if ttt is False or ttt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("the training-time test's attention has no dropout; set attention_dropout to 0")
    sizes = None if ttt is True else list(ttt)
    return ttt_attention(query, key, value, attention_mask, scaling, sizes=sizes), None


AttentionInterface.register(ATTENTION, eagle_attention)


def eagle3_layer_inputs(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high features: the INPUTS of these target layers (= transformers' hidden_states[i]), what
    the reference code (SafeAILab eagle/model/modeling_llama_kv.py, hard-coded), SGLang and speculators capture
    when a checkpoint names no layers."""
    return 2, num_layers // 2, num_layers - 3


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default features as draftsmith's feature_layers (layer OUTPUTS): the input of layer i is the
    output of layer i - 1, so [1, L//2 - 1, L-4] (SmolLM2's 30 layers: [1, 14, 26] = hidden_states[2, 15, 27]).
    Clipped into [0, L) for shallow targets, distinct and sorted (engines capture each layer once, in layer order).
    A drafter's config always records its layers, so this default never changes what a saved drafter reads."""
    return sorted({min(max(i - 1, 0), num_layers - 1) for i in eagle3_layer_inputs(num_layers)})


def family_classes(config: PretrainedConfig) -> tuple[type, type, type]:
    """(DecoderLayer, RMSNorm, RotaryEmbedding) classes of the transformers model family of `config`."""
    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    module = importlib.import_module(module_name)
    found = {}
    for suffix in ("DecoderLayer", "RMSNorm", "RotaryEmbedding"):
        names = [n for n in dir(module) if n.endswith(suffix) and not n.startswith("_")]
        if len(names) != 1:
            raise ValueError(f"EAGLE drafters need a decoder-only family with one {suffix} class; "
                             f"{module_name} has {names or 'none'} (model_type {config.model_type!r})")
        found[suffix] = getattr(module, names[0])
    return found["DecoderLayer"], found["RMSNorm"], found["RotaryEmbedding"]


class EagleModel(PreTrainedModel):
    config_class = EagleConfig
    base_model_prefix = "eagle"
    main_input_name = "input_ids"
    _no_split_modules = []

    def __init__(self, config: EagleConfig):
        super().__init__(config)
        if config.eagle_version not in (1, 3):
            raise ValueError(f"eagle_version={config.eagle_version}: draftsmith builds EAGLE-1 and EAGLE-3")
        lc = config.layer_config()
        layer_cls, norm_cls, rotary_cls = family_classes(lc)
        H, eps = config.hidden, lc.rms_norm_eps
        self.midlayer = layer_cls(lc, layer_idx=0)
        self._rotary = (rotary_cls, lc)  # built on first use on the input's device (its buffers are not saved)
        self._rope: list[nn.Module] = []
        if config.eagle_version == 1:
            self.fc = nn.Linear(2 * H, H, bias=True)
            self.midlayer.input_layernorm = nn.Identity()  # EAGLE-1 drops the first layer's input norm
        else:
            n_feat = len(config.feature_layers or [])
            if n_feat < 1:
                raise ValueError("EAGLE-3 needs feature_layers (target layers whose outputs are fused)")
            self.fc = nn.Linear(n_feat * H, H, bias=False)
            attn = self.midlayer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):  # the layer attends over concat(embedding, hidden): 2H
                old = getattr(attn, name)
                setattr(attn, name, nn.Linear(2 * H, old.out_features, bias=old.bias is not None))
            self.midlayer.hidden_norm = norm_cls(H, eps=eps)
            self.norm = norm_cls(H, eps=eps)
            N = config.draft_vocab_size or config.target_vocab
            self.lm_head = nn.Linear(H, N, bias=False)
            self.register_buffer("d2t", torch.zeros(N, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.target_vocab, dtype=torch.bool))
            if config.parallel_drafts:
                self.mask_embedding = nn.Parameter(torch.zeros(H))
                self.mask_hidden = nn.Parameter(torch.zeros(n_feat * H))
        self._target: list[nn.Module] = []  # the frozen target (embedding, LM head): borrowed, never saved
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
            nn.init.ones_(module.weight)  # RMSNorm
        else:  # MoE families keep their experts and router as bare parameters [E, ...], [E, H]
            for p in module.parameters(recurse=False):
                if p.dim() >= 2:
                    nn.init.normal_(p, std=std)
                elif p.dim() == 1 and not hasattr(module, "weight"):
                    nn.init.zeros_(p)

    # --- construction and the target -------------------------------------------------------------------------

    @classmethod
    def from_target(cls, target: PreTrainedModel, version: int = 3, feature_layers: list[int] | None = None,
                    draft_vocab: list[int] | None = None, target_name_or_path: str | None = None,
                    parallel_drafts: int | None = None) -> "EagleModel":
        """A fresh drafter for `target`. EAGLE-3: feature_layers default to EAGLE-3's (default_feature_layers) and
        are recorded in the config; draft_vocab (target ids) defaults to the whole vocabulary; the LM head starts
        from the target's rows of those tokens. parallel_drafts K > 1: P-EAGLE, its placeholder embedding starting
        as the mean of the target's embeddings."""
        tc = target.config.get_text_config()
        L = tc.num_hidden_layers
        if version == 3:
            feature_layers = list(feature_layers) if feature_layers else default_feature_layers(L)
            bad = [i for i in feature_layers if not 0 <= i < L]
            if bad:
                raise ValueError(f"feature_layers {bad} are not decoder layers of the target (it has {L}: 0..{L - 1})")
        vocab = sorted(set(draft_vocab)) if draft_vocab is not None and version == 3 else None
        config = EagleConfig(
            eagle_version=version, target_config=tc.to_dict(), feature_layers=feature_layers,
            draft_vocab_size=(len(vocab) if vocab else tc.vocab_size) if version == 3 else None,
            target_name_or_path=target_name_or_path or tc._name_or_path or None,
            target_revision=getattr(tc, "_commit_hash", None), parallel_drafts=parallel_drafts,
        )
        model = cls(config)
        head = target.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the target's LM head has a bias; EAGLE drafters support bias-free LM heads only")
        if version == 3:
            model.set_draft_vocab(vocab if vocab else list(range(tc.vocab_size)))
            with torch.no_grad():
                model.lm_head.weight.copy_(head.weight[model.draft_ids()])
                if config.parallel_drafts:  # a mean token, and a random feature (speculators' randn)
                    model.mask_embedding.copy_(target.get_input_embeddings().weight.mean(0))
                    model.mask_hidden.normal_()
        model.attach_target(target)
        return model.to(device=head.weight.device)

    def check_target(self, target_config: PretrainedConfig) -> None:
        """Refuse a target of another family, hidden size or vocabulary than the one this drafter was trained on."""
        tc, mine = target_config.get_text_config(), self.config.target_config
        problems = [f"{k}: drafter {mine.get(k)}, target {getattr(tc, k, None)}"
                    for k in ("model_type", "hidden_size", "vocab_size") if mine.get(k) != getattr(tc, k, None)]
        layers = self.config.feature_layers or []
        if layers and max(layers) >= tc.num_hidden_layers:
            problems.append(f"feature_layers {layers} need {max(layers) + 1} layers, target has "
                            f"{tc.num_hidden_layers}")
        if problems:
            raise ValueError(f"EAGLE drafter (trained for target {self.config.target_name_or_path!r}) does not fit "
                             f"target {tc._name_or_path!r}: {'; '.join(problems)}. Load the target it was trained on.")

    def attach_target(self, target: PreTrainedModel) -> None:
        """Check compatibility and borrow the target's frozen embedding (and LM head, for EAGLE-1)."""
        self.check_target(target.config)
        self._target[:] = [target]

    @property
    def target(self) -> PreTrainedModel:
        if not self._target:
            raise RuntimeError("this EAGLE drafter has no target: call attach_target(target) first")
        return self._target[0]

    # --- draft vocabulary (EAGLE-3) ---------------------------------------------------------------------------

    def set_draft_vocab(self, target_ids: list[int]) -> None:
        """d2t / t2d from the sorted target ids of the draft vocabulary (EAGLE-3's offset convention)."""
        ids = torch.tensor(sorted(set(target_ids)), dtype=torch.long)
        V = self.config.target_vocab
        if len(ids) != self.d2t.numel() or ids[0] < 0 or ids[-1] >= V:
            raise ValueError(f"the draft vocabulary must be {self.d2t.numel()} distinct target ids in [0, {V}), "
                             f"got {len(ids)} from {int(ids[0])} to {int(ids[-1])}")
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_ids(self) -> torch.Tensor:
        """[N] the target id of every draft id (EAGLE-3), or of every target id (EAGLE-1)."""
        if self.config.eagle_version == 1:
            return torch.arange(self.config.target_vocab, device=self.fc.weight.device)
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    # --- forward ----------------------------------------------------------------------------------------------

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [..., F] -> the first step's hidden input [..., H] (EAGLE-3: fc of the concatenated
        layers; EAGLE-1: the last hidden state itself)."""
        features = features.to(self.fc.weight.dtype)
        return self.fc(features) if self.config.eagle_version == 3 else features

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, cache=None, ttt: bool | list[int] = False) -> torch.Tensor:
        """One draft step. input_ids [B, T] (x_{t+1}), hidden_states [B, T, H] (fused feature or the previous
        step's output at t), position_ids [B, T], attention_mask [B or 1, 1, T, T_cache + T] additive, cache: a
        transformers Cache holding earlier pairs (appended to). ttt: the cache holds earlier training-time-test
        steps over the same T anchors and attention_mask [., 1, T, T] covers step 0's block (`ttt_attention`); with
        COD, T is this step's anchors, the mask [., 1, T, n] their rows of step 0's and ttt the anchors of every
        step after step 0 (ttt_attention's `sizes`).
        Returns the output [B, T, H]: EAGLE-1's predicted feature f^_{t+1}, EAGLE-3's h (before `norm`).
        P-EAGLE: where input_ids is -1 (a placeholder) the token input is mask_embedding; the caller gives the
        placeholder's hidden input there (`placeholder_hidden`, a constant at inference that a proposer fuses once)."""
        embeds = self.target.get_input_embeddings()(input_ids.clamp(min=0)).to(hidden_states.dtype)  # [B, T, H]
        if self.config.parallel_drafts:
            embeds = torch.where((input_ids < 0)[..., None], self.mask_embedding.to(embeds.dtype), embeds)
        rope = self.rotary(hidden_states.device)(hidden_states, position_ids)
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, position_embeddings=rope, cache=cache,
                      ttt=ttt)
        if self.config.eagle_version == 1:
            return self.midlayer(self.fc(torch.cat([embeds, hidden_states], dim=-1)), **kwargs)
        layer = self.midlayer
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden_states)], dim=-1)  # [B, T, 2H]
        h = hidden_states + layer.self_attn(hidden_states=x, **kwargs)[0]
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def placeholder_hidden(self) -> torch.Tensor:
        """P-EAGLE: the placeholders' hidden input [H], mask_hidden fused by fc like the target's features."""
        return self.fuse(self.mask_hidden)

    def rotary(self, device: torch.device) -> nn.Module:
        """The family's rotary embedding on `device`, built once: a plain attribute, so from_pretrained's
        meta-device construction never leaves its inv_freq buffer uninitialised."""
        if not self._rope or self._rope[0].inv_freq.device != device:
            cls, config = self._rotary
            self._rope[:] = [cls(config=config).to(device)]
        return self._rope[0]

    def head_input(self, out: torch.Tensor) -> torch.Tensor:
        """A step's output [..., H] -> the LM head's input (EAGLE-3 applies `norm`; EAGLE-1 regresses it)."""
        return self.norm(out) if self.config.eagle_version == 3 else out

    def head_weight(self) -> torch.Tensor:
        """[N, H]: EAGLE-3's own head over the draft vocabulary, EAGLE-1's borrowed target head [V, H]."""
        if self.config.eagle_version == 3:
            return self.lm_head.weight
        return self.target.get_output_embeddings().weight

    def logits(self, out: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """A step's output [..., H] -> logits [..., N] over draft ids (EAGLE-1: N = V, draft id = target id; or
        `head`, a linear layer over the target head's rows of a draft vocabulary: [..., N]). Heads are called as
        modules, so that inference's packed layers serve them."""
        if self.config.eagle_version == 3:
            return self.lm_head(self.head_input(out))
        return project(head if head is not None else self.target.get_output_embeddings(), self.head_input(out))
