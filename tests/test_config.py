"""Training configs: every shipped YAML parses, overrides are typed, unknown keys and bad values are clear errors."""
import re
from pathlib import Path

import pytest

from train.config import DRAFTER_SECTIONS, ConfigError, MedusaDrafter, TrainConfig, dump_config, load_config
from train.train_heads import parse_args

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("pipeline_"))  # the GPU pipeline's: tests/test_pipeline.py
REQUIRED = ["target=t", "output_dir=o"]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, TrainConfig) and cfg.target and cfg.output_dir
    assert cfg.drafter.kind in DRAFTER_SECTIONS


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"medusa_tiny.yaml", "medusa_smollm2.yaml", "draft_lm_tiny.yaml",
                                         "draft_lm_smollm2.yaml", "draft_lm_smollm2_gpu.yaml"}


def test_draft_lm_section_is_typed_and_checked():
    cfg = load_config(str(CONFIGS[0].parent / "draft_lm_tiny.yaml"),
                      ["drafter.losses={jsd: 1.0, ce: 0.5}", "drafter.init_layers=[1]", "drafter.lora=true"])
    assert (cfg.drafter.losses, cfg.drafter.init_layers, cfg.drafter.lora) == ({"jsd": 1.0, "ce": 0.5}, [1], True)
    bad = {
        "drafter.losses={kl: 1.0}": "drafter.losses={'kl': 1.0} names unknown losses ['kl']; known: forward_kl",
        "drafter.losses=3": "drafter.losses='3' must be a mapping, e.g. drafter.losses={forward_kl: 1.0}",
        "drafter.losses={tvd: 0}": "weights must be >= 0, at least one > 0",
        "drafter.init_layers=[0, 1, 2]": "copies more layers than drafter.num_layers=2",
        "drafter.jsd_beta=1": "must be strictly between 0 and 1",
        "drafter.num_heads=3": "unknown key drafter.num_heads (a command-line override) in drafter",
        ("drafter.loss_vocab=draft", "drafter.draft_vocab=null"): "drafter.loss_vocab='draft' needs drafter.draft_vocab",
        "drafter.loss_vocab=frequent": "drafter.loss_vocab='frequent' is not allowed; use one of 'full', 'draft'",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(str(CONFIGS[0].parent / "draft_lm_tiny.yaml"),
                        list(overrides) if isinstance(overrides, tuple) else [overrides])


def test_main_config_is_the_readme_job():
    cfg = load_config(str(CONFIGS[0].parent / "medusa_smollm2.yaml"))
    assert (cfg.target, cfg.data.train, cfg.eval.questions) == ("smollm2-135m-instruct", "sharegpt", "mt-bench")
    assert cfg.drafter == MedusaDrafter(num_heads=4, num_layers=1, share_lm_head=True, draft_vocab=8192)


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(None, REQUIRED + [
        "training.lr=3e-4", "training.zero_stage=2", "training.precision=bf16", "logging.wandb=true",
        "eval.per_category=null", "training.betas=[0.8, 0.95]", "drafter.num_heads=5", "target=/x/y",
        "checkpoint.resume=none", "data.limit=100", "training.max_steps=7",
    ])
    assert cfg.training.lr == 3e-4 and isinstance(cfg.training.lr, float)
    assert cfg.training.zero_stage == 2 and cfg.training.precision == "bf16"
    assert cfg.logging.wandb is True and cfg.eval.per_category is None
    assert cfg.training.betas == [0.8, 0.95] and cfg.drafter.num_heads == 5
    assert (cfg.target, cfg.checkpoint.resume, cfg.data.limit, cfg.training.max_steps) == ("/x/y", "none", 100, 7)


def test_later_override_wins_and_yaml_is_overridden(tmp_path):
    path = write(tmp_path, "target: a\noutput_dir: b\ntraining:\n  lr: 3e-4\n  epochs: 2\n")
    cfg = load_config(path, ["training.epochs=3", "training.epochs=4"])
    assert cfg.training.lr == 3e-4  # PyYAML reads 3e-4 as text: accepted for a float field
    assert cfg.training.epochs == 4


def test_unknown_yaml_key_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "target: a\noutput_dir: b\ntraining:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key training\.lrr in training; valid keys: epochs, "
                                          r"max_steps, .*lr,"):
        load_config(path)


def test_unknown_top_level_and_override_keys():
    with pytest.raises(ConfigError, match=r"unknown key trainer \(a command-line override\) in the top level; valid "
                                          r"keys: target, output_dir, drafter, data, training"):
        load_config(None, REQUIRED + ["trainer.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key drafter\.depth \(a command-line override\) in drafter; valid "
                                          r"keys: kind, num_heads, num_layers, share_lm_head"):
        load_config(None, REQUIRED + ["drafter.depth=3"])


def test_unknown_drafter_kind_lists_known_kinds():
    with pytest.raises(ConfigError, match=r"drafter\.kind 'hydra' is not a known drafter kind; known kinds: medusa, "
                                          r"draft_lm, eagle"):
        load_config(None, REQUIRED + ["drafter.kind=hydra"])


@pytest.mark.parametrize("override, message", [
    ("training.zero_stage=4", r"training\.zero_stage='4' is not allowed; use one of 0, 1, 2, 3"),
    ("training.precision=fp16", r"training\.precision='fp16' is not allowed; use one of 'fp32', 'bf16'"),
    ("training.labels=teacher", r"training\.labels='teacher' is not allowed; use one of 'target', 'data'"),
    ("training.lr=fast", r"training\.lr='fast' is not a valid float"),
    ("training.epochs=1.5", r"training\.epochs='1.5' is not a valid int"),
    ("logging.wandb=maybe", r"logging\.wandb='maybe' is not a valid bool"),
    ("training.lr=-1", r"training\.lr=-1\.0 must be > 0"),
    ("training.betas=0.9", r"training\.betas='0.9' must be a list"),
    ("data.max_tokens=16", r"data\.max_tokens=16 must be >= data\.max_length \(1024\)"),
    ("training=3", r"training is a section: set its keys \(epochs, .*\), e\.g\. training\.<key>=value"),
    ("output_dir.x=3", r"output_dir is a value, not a section"),
    ("lr", r"override 'lr' is not of the form key=value"),
])
def test_bad_values_say_what_and_where(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, REQUIRED + [override])


@pytest.mark.parametrize("override, message", [
    ("drafter.cod_ratio=1.5", r"drafter\.cod_ratio=1\.5 is EAGLE-3's \(drafter\.version=3\) and must be in \(0, 1\]"),
    ("drafter.version=1", r"drafter\.cod_ratio=0\.7 is EAGLE-3's"),
    ("drafter.cod_min=0", r"drafter\.cod_min=0\.0 must be in \(0, 1\]"),
])
def test_cod_settings_say_what_and_where(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, REQUIRED + ["drafter.kind=eagle", "drafter.cod_ratio=0.7", override])


def test_yaml_values_must_have_the_field_type(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.epochs=1\.5 is not a valid int"):
        load_config(write(tmp_path, "target: a\noutput_dir: b\ntraining:\n  epochs: 1.5\n"))
    with pytest.raises(ConfigError, match=r"logging\.wandb='yes' is not a valid bool"):
        load_config(write(tmp_path, "target: a\noutput_dir: b\nlogging:\n  wandb: 'yes'\n"))
    with pytest.raises(ConfigError, match=r"the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "target: a\noutput_dir: b\npush:\ndrafter:\n"), ["push.private=true"])
    assert cfg.push.private and cfg.push.repo_id is None and cfg.drafter == MedusaDrafter()


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key output_dir: set it in the YAML file or as "
                                          r"output_dir=\.\.\."):
        load_config(None, ["target=x"])


def test_shared_lm_head_needs_matching_dtypes():
    with pytest.raises(ConfigError, match=r"training\.target_dtype='float32' must be bfloat16 with "
                                          r"drafter\.share_lm_head=true and training\.precision=bf16"):
        load_config(None, REQUIRED + ["drafter.share_lm_head=true", "training.precision=bf16"])
    load_config(None, REQUIRED + ["drafter.share_lm_head=true", "training.precision=bf16",
                                  "training.target_dtype=bfloat16"])


def test_dumped_config_loads_back_equal(tmp_path):
    cfg = load_config(str(CONFIGS[0]), ["training.lr=3e-4", "eval.limit=3"])
    dump_config(cfg, str(tmp_path / "dump.yaml"))
    assert load_config(str(tmp_path / "dump.yaml")) == cfg


@pytest.mark.parametrize("launcher_args", [["--local_rank=1"], ["--local-rank", "1"], []])
def test_entry_point_accepts_launcher_local_rank_and_overrides(launcher_args):
    tiny = str(CONFIGS[0].parent / "medusa_tiny.yaml")
    cfg, local_rank = parse_args(launcher_args + ["--config", tiny, "training.lr=3e-4", "output_dir=/tmp/x"])
    assert local_rank == (1 if launcher_args else None)
    assert cfg.training.lr == 3e-4 and cfg.output_dir == "/tmp/x"


def float_keys() -> list[str]:
    """Every float field of every section (each drafter kind's too), as a dotted key with the kind it needs."""
    import dataclasses
    import typing

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif float in (hint, *typing.get_args(hint)) and typing.get_origin(hint) not in (list, dict):
                yield f"{prefix}{f.name}"  # (float lists and mappings: checked below)
    keys = [(k, "medusa") for k in walk(TrainConfig, "") if not k.startswith("drafter.")]
    for kind, cls in DRAFTER_SECTIONS.items():
        keys += [(k, kind) for k in walk(cls, "drafter.")]
    return keys


def test_every_float_field_refuses_inf_and_nan(tmp_path):
    """lr=inf or grad_clip=inf trained a NaN drafter that was saved with exit 0: no float field takes inf or nan, from
    the command line or from YAML (`.inf`), whatever its own range check."""
    keys = float_keys()
    assert {("training.lr", "medusa"), ("training.grad_clip", "medusa"), ("training.head_decay", "medusa"),
            ("eval.temperature", "medusa"), ("drafter.temperature", "draft_lm")} <= set(keys)
    for key, kind in keys:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError, match=rf"{re.escape(key)}='{value}' is not a finite number"):
                load_config(None, REQUIRED + [f"drafter.kind={kind}", f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"c\.yaml: training\.lr=inf is not a finite number"):
        load_config(write(tmp_path, "target: a\noutput_dir: b\ntraining:\n  lr: .inf\n"))
    with pytest.raises(ConfigError, match=r"training\.betas\[1\]=nan is not a finite number"):
        load_config(None, REQUIRED + ["training.betas=[0.9, .nan]"])
    with pytest.raises(ConfigError, match=r"drafter\.losses\.ce=inf is not a finite number"):
        load_config(None, REQUIRED + ["drafter.kind=draft_lm", "drafter.losses={ce: .inf}"])


@pytest.mark.parametrize("key", ["target", "output_dir", "data.train", "checkpoint.resume"])
def test_empty_text_is_refused(key, tmp_path):
    """`output_dir=` (empty) silently meant the current directory."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} is empty; give it a value"):
        load_config(None, REQUIRED + [f"{key}="])
    with pytest.raises(ConfigError, match=rf"c\.yaml: {re.escape(key)} is empty"):
        load_config(write(tmp_path, f"target: a\noutput_dir: b\n{key.split('.')[0]}:" + (
            f"\n  {key.split('.')[1]}: ''\n" if "." in key else " ''\n")))


def test_timeout_is_a_positive_number_of_minutes():
    assert load_config(None, REQUIRED).training.timeout_minutes == 30.0
    assert load_config(None, REQUIRED + ["training.timeout_minutes=0.5"]).training.timeout_minutes == 0.5
    with pytest.raises(ConfigError, match=r"training\.timeout_minutes=0\.0 must be > 0"):
        load_config(None, REQUIRED + ["training.timeout_minutes=0"])
