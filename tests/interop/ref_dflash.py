"""Runs in the speculators environment (tests/interop/setup.sh): load a DFlash drafter with speculators' own
DFlashDraftModel and draft one block the way decoding does, through the reference's training forward.

    python ref_dflash.py MODEL_DIR INPUTS.safetensors OUT.safetensors [SOURCE_DIR BASE_MODEL]

With SOURCE_DIR (a z-lab / SGLang layout folder), speculators' DFlashConverter first converts it into MODEL_DIR
against BASE_MODEL (the verifier), with its own validation. MODEL_DIR's verifier (config.json) supplies
embed_tokens and lm_head.

INPUTS: features [1, a, F] (the target's fused layers at positions 0..a-1), root [1] (the token at position a).
The block [root, mask, ..., mask] is the reference's anchored block at anchor a: _backbone_forward with one valid
anchor (loss_mask 1 at a only) sees exactly the context 0..a-1 and the block, both ways (eager attention, the
dense form of its flex mask). Positions after the anchor are padding no query of the block can see.
OUT: logits [B, V] of the block, positions [B] (the block's rotary positions, as the reference chose them), and
the keys the loader left missing or found unexpected (in the metadata)."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig

model_dir, inputs_path, out_path = sys.argv[1:4]
if len(sys.argv) > 4:
    from speculators.convert.dflash.converter import DFlashConverter

    DFlashConverter().convert(sys.argv[4], model_dir, base_model=sys.argv[5], validate=True)

config = DFlashSpeculatorConfig.from_pretrained(model_dir)
config.transformer_layer_config._attn_implementation = "eager"  # dense masks: flex attention needs a GPU build
model = DFlashDraftModel.from_pretrained(model_dir, config=config).float().eval()

in_file = set(load_file(f"{model_dir}/model.safetensors"))
in_model = set(model.state_dict())
keys = {"missing": sorted(in_model - in_file), "unexpected": sorted(in_file - in_model)}

inputs = load_file(inputs_path)
context, root = inputs["features"].float(), int(inputs["root"][0])
a, B, H = context.shape[1], model.block_size, model.hidden_size
T = a + B + 1                                     # select_anchors never picks one of the last B positions
hidden = torch.cat([context, context.new_zeros(1, T - a, context.shape[-1])], dim=1)   # [1, T, F]
input_ids = torch.full((1, T), model.mask_token_id)
input_ids[0, a] = root
loss_mask = torch.zeros(1, T)
loss_mask[0, a] = 1                               # the only anchor: a

positions = []
model.rotary_emb.register_forward_hook(lambda module, args, out: positions.append(args[1][0, -B:]))
with torch.no_grad():
    _, logits, *_ = model._backbone_forward(hidden, input_ids, loss_mask, torch.zeros(1, T, H),
                                            torch.zeros(1, T, dtype=torch.long), max_anchors=1)
save_file({"logits": logits[0].contiguous(), "positions": positions[0].contiguous()}, out_path,
          metadata={"keys": json.dumps(keys)})
