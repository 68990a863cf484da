"""Runs in the eagle environment (tests/interop/setup.sh) with SafeAILab's EAGLE code on the path
(DRAFTSMITH_EAGLE_REPO): times EaModel.eagenerate, greedy, on given prompts for tests/interop/eagle_loop_speed.py.

    python ref_eagle_speed.py EXPORT_DIR TARGET_DIR JOB.json OUT.json

JOB: prompts (token-id lists, in the order to run them), max_new_tokens, total_token, depth, top_k, threads.
OUT: per prompt the new tokens eagenerate returns, its target forwards (prefill included) and seconds
(time.perf_counter around the call, after one untimed warm-up); the keys the drafter's weights left missing or
found unexpected; the versions that ran."""
import json
import os
import sys
import time

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.environ["DRAFTSMITH_EAGLE_REPO"])
from eagle.model.ea_model import EaModel  # noqa: E402


def load(export_dir: str, target_dir: str, job: dict) -> tuple[EaModel, dict]:
    """EaModel as its README builds it, and what loading the export's state dict reported."""
    ea = EaModel.from_pretrained(use_eagle3=True, base_model_path=target_dir, ea_model_path=export_dir,
                                 total_token=job["total_token"], depth=job["depth"], top_k=job["top_k"],
                                 torch_dtype=torch.float32).eval()
    # EaModel discards load_state_dict's report; loading the same tensors again records it and changes nothing
    loaded = ea.ea_layer.load_state_dict(load_file(os.path.join(export_dir, "model.safetensors")), strict=False)
    return ea, {"missing": sorted(loaded.missing_keys), "unexpected": sorted(loaded.unexpected_keys)}


def generate(ea: EaModel, prompt: list[int], max_new_tokens: int) -> dict:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out, _, last_step = ea.eagenerate(ids, temperature=0.0, max_new_tokens=max_new_tokens, log=True)
    seconds = time.perf_counter() - start
    # last_step is the index of the last verify step: last_step + 1 verify forwards, plus the prefill
    return {"tokens": out[0, len(prompt):].tolist(), "forwards": int(last_step) + 2, "seconds": seconds}


def main() -> None:
    export_dir, target_dir, job_path, out_path = sys.argv[1:5]
    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    ea, keys = load(export_dir, target_dir, job)
    with torch.no_grad():
        generate(ea, job["prompts"][0], 16)  # warm-up, not counted
        results = [generate(ea, prompt, job["max_new_tokens"]) for prompt in job["prompts"]]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    with open(out_path, "w") as f:
        json.dump({"results": results, "keys": keys, "versions": versions, "threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
