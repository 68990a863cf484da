"""The shipped zoo (zoo/<target>/<name>/) keeps what its cards promise: each drafter loads against its target,
decodes losslessly and accepts at least the tau floor its card records, on the card's own few questions and
options. A change that breaks loading, feature layers or tree verification fails here. Skips when zoo/ is empty."""
from functools import lru_cache
from pathlib import Path

import pytest

from drafters import load_drafter
from drafters.zoo import read_manifest
from inference.eval_config import EvalConfig
from inference.evaluate import evaluate_drafter
from target.model import load_target

ZOO = Path(__file__).resolve().parents[1] / "zoo"
FOLDERS = sorted(p.parent for p in ZOO.glob("*/*/zoo.json"))


@lru_cache(maxsize=2)
def target_of(name: str):
    return load_target(name)


def assert_keeps_floor(folder: Path) -> None:
    """Evaluate a zoo folder with its card's regression options; lossless, and tau at or above the floor."""
    manifest = read_manifest(folder)
    regression = manifest.get("card", {}).get("regression")
    if not regression:
        pytest.skip(f"{folder} records no regression floor in its card")
    target, tokenizer = target_of(manifest["target"])
    drafter = load_drafter(str(folder), target).to(target.dtype)
    report = evaluate_drafter(target, tokenizer, drafter, EvalConfig(**regression["eval"]), progress=False)
    assert report["lossless"]["mismatches"] == 0
    assert report["overall"]["tau"] >= regression["tau_floor"], (
        f"{folder}: tau {report['overall']['tau']:.3f} is below the card's floor {regression['tau_floor']} "
        f"(measured {regression['tau']:.3f} when it was trained)")


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS or [None], ids=lambda p: f"{p.parent.name}/{p.name}" if p else "empty")
def test_zoo_drafter_is_lossless_and_keeps_its_floor(folder):
    if folder is None:
        pytest.skip("zoo/ holds no drafters")
    assert_keeps_floor(folder)
