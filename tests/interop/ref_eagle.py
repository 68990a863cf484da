"""Runs in the eagle environment (tests/interop/setup.sh) with SafeAILab's EAGLE code on the path
(DRAFTSMITH_EAGLE_REPO, a checkout: it is not on PyPI): load an EAGLE-3 export (native layout, --format sglang)
or an EAGLE-1 export (either layout) the way the reference does and record what it computes.

    python ref_eagle.py {3|1} EXPORT_DIR TARGET_DIR INPUTS.safetensors OUT.safetensors

INPUTS: ids [1, T], features [1, n, F] (EAGLE-3: 3H fused layers in engine order; EAGLE-1: the last hidden
state), tokens [1, n], prompt [1, P], new_tokens [1].
OUT: logits [n, N] of the drafter's first step (cnets.Model / cnets1.Model, embedding loaded from the target as
EaModel does; EAGLE-1 through the target's LM head),
features [T, 3H] (what EaModel's target captures on `ids` for its drafter), generated [G] (EaModel.eagenerate,
greedy, from `prompt`), and in the metadata the keys load_state_dict left missing or found unexpected, and the
tokens per target forward of that generation."""
import json
import os
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.environ["DRAFTSMITH_EAGLE_REPO"])
import eagle.model.ea_model as ea_model  # noqa: E402
from eagle.model.cnets import Model  # noqa: E402
from eagle.model.cnets1 import Model as Model1  # noqa: E402
from eagle.model.configs import EConfig  # noqa: E402

version, export_dir, target_dir, inputs_path, out_path = sys.argv[1:6]
eagle3 = version == "3"
inputs = load_file(inputs_path)

# 1. the drafter as EaModel builds it: embedding from the target's checkpoint, then the export's state dict
config = EConfig.from_pretrained(os.path.join(export_dir, "config.json"))
with open(os.path.join(export_dir, "config.json")) as f:
    bias = json.load(f).get("bias", True)  # EaModel's reading of fc's bias
model = (Model(config, load_emb=True, path=target_dir) if eagle3
         else Model1(config, load_emb=True, path=target_dir, bias=bias)).float().eval()
loaded = model.load_state_dict(load_file(os.path.join(export_dir, "model.safetensors")), strict=False)
keys = {"missing": sorted(loaded.missing_keys), "unexpected": sorted(loaded.unexpected_keys)}
with torch.no_grad():
    h = model(inputs["features"].float(), inputs["tokens"])                    # [1, n, H], positions 0..n-1
    if eagle3:
        logits = model.lm_head(model.norm(h))[0]                               # [n, N]
    else:  # EAGLE-1 predicts the target's next feature; the target's LM head reads it
        index = json.load(open(os.path.join(target_dir, "model.safetensors.index.json")))["weight_map"]
        head = load_file(os.path.join(target_dir, index["lm_head.weight"]))["lm_head.weight"]
        logits = (h @ head.float().T)[0]                                       # [n, V]

# 2. its decoding loop: EaModel.eagenerate, greedy. The tokenizer is only asked for eos_token_id; -1 never stops.
ea_model.AutoTokenizer = SimpleNamespace(from_pretrained=lambda *a, **k: SimpleNamespace(eos_token_id=-1))
ea = ea_model.EaModel.from_pretrained(use_eagle3=eagle3, base_model_path=target_dir, ea_model_path=export_dir,
                                      total_token=16, depth=4, top_k=4, torch_dtype=torch.float32).eval()
with torch.no_grad():
    ea_model.reset_tree_mode(ea)  # the features EaModel hands its drafter (EAGLE-3: its hard-coded layer capture)
    base = ea.base_model.model(input_ids=inputs["ids"])
    captured = (torch.cat(base["hidden_states"], dim=-1) if eagle3 else base[0])[0]  # [T, F]
    ids, new_token, steps = ea.eagenerate(inputs["prompt"], temperature=0.0,
                                          max_new_tokens=int(inputs["new_tokens"][0]), max_length=512, log=True)
generated = ids[0, inputs["prompt"].shape[1]:]
meta = {"keys": json.dumps(keys), "tau": str(len(generated) / (int(steps) + 1))}
save_file({"logits": logits.contiguous(), "generated": generated.contiguous(), "features": captured.contiguous()},
          out_path, metadata=meta)
