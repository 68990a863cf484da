"""Runs in the speculators environment (tests/interop/setup.sh): load an exported vllm-layout EAGLE-3 drafter with
speculators' own Eagle3DraftModel and record what the reference computes on the inputs draftsmith used.

    python ref_speculators.py EXPORT_DIR INPUTS.safetensors OUT.safetensors

INPUTS: features [1, n, 3H] (the fused layers, in engine order), tokens [1, n] (x_{j+1} at anchor j), steps [1].
OUT: logits [steps, n, N], the draft head's logits at every training-time-test step (captured from its lm_head),
and the keys the loader left missing or found unexpected (as 0/1 masks over a name list in the metadata)."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

export_dir, inputs_path, out_path = sys.argv[1:4]
config = Eagle3SpeculatorConfig.from_pretrained(export_dir)
config.transformer_layer_config._attn_implementation = "eager"  # dense masks: flex attention needs a GPU build
model = Eagle3DraftModel.from_pretrained(export_dir, config=config).float().eval()

in_file = set(load_file(f"{export_dir}/model.safetensors"))
in_model = set(model.state_dict())
keys = {"missing": sorted(in_model - in_file), "unexpected": sorted(in_file - in_model)}

inputs = load_file(inputs_path)
tokens, steps = inputs["tokens"], int(inputs["steps"][0])
n = tokens.shape[1]
logits = []
model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[0].float()))
with torch.no_grad():
    model(hidden_states=inputs["features"].float(), input_ids=tokens, document_ids=torch.zeros_like(tokens),
          position_ids=torch.arange(n)[None], ttt_steps=steps)
save_file({"logits": torch.stack(logits).contiguous()}, out_path, metadata={"keys": json.dumps(keys)})
