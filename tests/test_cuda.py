"""The verification loop and the evaluation on a CUDA device (skipped where there is none)."""
import pytest
import torch

from conftest import make_tiny_target, perturbed_medusa
import copy

from drafters import EagleModel, MedusaModel
from inference.eval_config import EvalConfig
from inference.evaluate import evaluate_drafter
from inference.proposers import MedusaProposer
from inference.speculative import speculative_generate
from target.model import load_target
from inference.tree import grow_tree
from tiny_assets import write_questions, write_tiny_target
from train.eagle_objective import Eagle3Objective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_verification_is_lossless_on_cuda(arch):
    target = make_tiny_target(arch).cuda()
    proposer = MedusaProposer(perturbed_medusa(target), grow_tree([[0.6, 0.2], [0.4, 0.2], [0.3, 0.1]], 8))
    prompt = torch.tensor([1, 17, 33, 250, 9], device="cuda")
    reference = target.generate(prompt[None], max_new_tokens=40, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert speculative_generate(target, proposer, prompt, 40, {2}).tokens == reference


def test_evaluation_runs_on_cuda(tmp_path):
    target, tokenizer = load_target(write_tiny_target(tmp_path / "target"), device="cuda")
    config = EvalConfig(questions=write_questions(tmp_path / "q.jsonl"), max_new_tokens=16, check_lossless=True,
                        max_tree_nodes=8)
    report = evaluate_drafter(target, tokenizer, perturbed_medusa(target), config, progress=False)
    assert report["lossless"] == {"checked": 5, "mismatches": 0}
    assert report["setup"]["device"].startswith("cuda")


def test_eagle3_objective_on_cuda_matches_cpu():
    """The training-time test on CUDA (fused attention) gives the CPU's loss and gradients (unfused), fp32."""
    target = make_tiny_target("llama")
    drafter = EagleModel.from_target(target, version=3)
    ids = torch.randint(3, target.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :8] = 0
    results = []
    for device in ("cpu", "cuda"):
        t, d = copy.deepcopy(target).to(device), copy.deepcopy(drafter).to(device)
        d.attach_target(t)  # the drafter borrows the target's embedding; it does not move with .to()
        loss, stats = Eagle3Objective(d, t, steps=4)(ids.to(device), torch.ones_like(ids).to(device),
                                                     loss_mask.to(device))
        loss.backward()
        results.append((loss.detach().cpu(), stats, [p.grad.cpu() for p in d.parameters() if p.requires_grad]))
    (cpu_loss, cpu_stats, cpu_grads), (gpu_loss, gpu_stats, gpu_grads) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, atol=1e-5, rtol=1e-4)
    assert torch.equal(gpu_stats[:, 2], cpu_stats[:, 2])
    for a, b in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_benchmark_runs_on_cuda(tmp_path):
    from drafters.draft_lm import build_draft_lm
    from inference.benchmark import main
    target_dir = write_tiny_target(tmp_path / "target")
    target, _ = load_target(target_dir)
    drafter = perturbed_medusa(target)
    drafter.config.head_topk_accuracy = [[0.5, 0.2, 0.1], [0.3, 0.1, 0.1], [0.2, 0.1, 0.05]]  # for --tree auto
    drafter.save_pretrained(tmp_path / "medusa")
    medusa = str(tmp_path / "medusa")
    build_draft_lm(target, 2, [0]).save_pretrained(tmp_path / "draft")
    results = main(["--target", target_dir, "--drafters", medusa, str(tmp_path / "draft"), "--device", "cuda",
                    "--questions", write_questions(tmp_path / "q.jsonl"), "--max-new-tokens", "16",
                    "--max-tree-nodes", "8", "--no-progress", "--output", str(tmp_path / "bench")])
    assert results["machine"]["device"].startswith("cuda") and "gpu" in results["machine"]
    assert list(results["methods"]) == ["plain", "medusa", "draft", "hf-lookup", "hf-assisted(draft)"]
    assert all(m["lossless"] == {"checked": 5, "mismatches": 0} for n, m in results["methods"].items() if n != "plain")
