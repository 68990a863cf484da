"""Runs in the speculators environment (tests/interop/setup.sh): load a P-EAGLE export with speculators' own
PEagleDraftModel and run its training forward on exactly one decoding step's inputs.

    python ref_peagle.py EXPORT_DIR INPUTS.safetensors OUT.safetensors

INPUTS: features [1, n, F] and tokens [1, n] (the verified pairs: feature j with token j + 1, the last token the
root), depths [1] (K).
Its forward draws which (anchor, depth) elements to train on at random (COD sampling,
data.generate_cod_sample_indices). That draw is replaced by a fixed one: depth 0 at every position, as the
sampler always has it, and depths 1..K-1 at anchor n - 1 only (the root's pair), i.e. the root's pair followed by
K - 1 placeholders (mask token, mask_hidden) at positions n..n+K-2: one decoding forward. Everything else (the
embedding of the mask token, mask_hidden through fc, its mask_mod, positions anchor + depth, layers, head) is the
reference's own code. K - 1 padding positions after the pairs keep its gathers in range; the mask hides them.
OUT: logits [K, N] (the root's pair, then the placeholders, from its lm_head) and the loader's missing and
unexpected keys (in the metadata)."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
import speculators.models.peagle.core as peagle
from speculators.losses import resolve_loss_config
from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig

export_dir, inputs_path, out_path = sys.argv[1:4]
config = PEagleSpeculatorConfig.from_pretrained(export_dir)
config.transformer_layer_config._attn_implementation = "eager"  # dense masks: flex attention needs a GPU build
model = PEagleDraftModel.from_pretrained(export_dir, config=config).float().eval()

in_file = set(load_file(f"{export_dir}/model.safetensors"))
in_model = set(model.state_dict())
keys = {"missing": sorted(in_model - in_file), "unexpected": sorted(in_file - in_model)}

inputs = load_file(inputs_path)
features, tokens, K = inputs["features"].float(), inputs["tokens"], int(inputs["depths"][0])
n = tokens.shape[1]
S = n + K - 1
features = torch.cat([features, features.new_zeros(1, K - 1, features.shape[-1])], dim=1)   # [1, S, F]
tokens = torch.cat([tokens, tokens.new_zeros(1, K - 1)], dim=1)                             # [1, S]
anchor_pos = torch.cat([torch.arange(S), torch.full((K - 1,), n - 1)])
depth = torch.cat([torch.zeros(S, dtype=torch.long), torch.arange(1, K)])
peagle.generate_cod_sample_indices = lambda **kwargs: (anchor_pos, depth)

logits = []
model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[0].float()))
with torch.no_grad():
    model(hidden_states=features, input_ids=tokens, document_ids=torch.zeros_like(tokens),
          position_ids=torch.arange(S)[None], loss_mask=torch.ones(1, S),
          verifier_last_hidden_states=torch.zeros(1, S, model.hidden_size), num_depths=K,
          loss_config=resolve_loss_config("kl_div", "eager"))  # the fused loss needs Triton
rows = torch.cat([torch.tensor([n - 1]), torch.arange(S, S + K - 1)])  # the root's pair, then its placeholders
save_file({"logits": logits[0][rows].contiguous()}, out_path, metadata={"keys": json.dumps(keys)})
