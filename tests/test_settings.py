"""The settings declaration drives the validation, the CLI flags, the wizard's fields and the resume-safe list;
loss_step is one micro-batch's loss on the tiny UNet."""

from __future__ import annotations

import argparse

import pytest

from lorakit.errors import TrainingError
from lorakit.train import SETTINGS, resolve_config
from lorakit.train.config import DEFAULTS, RESUME_SAFE_KEYS, numeric_config_diff
from lorakit.train.kohya import kohya_flag_values
from lorakit.train.settings import (
    ALIASES,
    BY_NAME,
    FLAGGED,
    WIZARD_FIELDS,
    Setting,
    add_setting_flags,
    canonical_name,
    flag_values,
)


def test_every_setting_is_declared_once_and_everything_else_derives_from_it() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)) and list(DEFAULTS) == names
    # An alias names one setting, and never shadows another setting's own name.
    assert not set(ALIASES) & set(names) and all(ALIASES[a] in BY_NAME for a in ALIASES)
    assert set(RESUME_SAFE_KEYS) == {s.name for s in SETTINGS if s.resume_safe}
    assert all(s.kind in ("int", "float") for s in WIZARD_FIELDS)
    for s in SETTINGS:
        assert s.help and s.group in ("data", "network", "optimisation", "validation", "output"), s.name
        assert s.derived_from is None or s.derived_from in BY_NAME, s.name
        # The declared default passes its own check (derived and optional ones may be null).
        assert s.default is None or s.problem(s.default) is None, s.name


def test_the_cli_flags_are_the_declared_ones(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {s.flag for s in FLAGGED}
    args = parser.parse_args(["--batch", "3", "--lr", "2e-4", "--mixed-precision", "bf16"])
    assert {k: v for k, v in flag_values(args).items() if v is not None} == \
        {"batch_size": 3, "lr": 2e-4, "mixed_precision": "bf16"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mixed-precision", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("rank", 0, "rank must be a positive integer, got 0"),
    ("steps", -1, "steps must be a positive integer or null, got -1"),
    ("seed", 2**32, "seed must be at most 4294967295, got 4294967296"),
    ("keep_tokens", -1, "keep_tokens must be an integer >= 0, got -1"),
    ("lr", float("nan"), "lr must be a number > 0, got nan"),
    ("min_snr_gamma", 0, "min_snr_gamma must be a positive number or null, got 0"),
    ("caption_dropout", 1.0, "caption_dropout must be a number in [0, 1), got 1.0"),
    ("ip_noise_gamma", -0.1, "ip_noise_gamma must be a number >= 0, got -0.1"),
    ("train_conv", "yes", "train_conv must be true or false, got 'yes'"),
    ("optimizer", "sgd", "optimizer must be one of auto, adamw, adamw8bit, got 'sgd'"),
    ("unet_target_modules", [], "unet_target_modules must be a module set (kohya, attention) or a non-empty list of module names, got []"),
    ("conv_target_modules", "everything", "conv_target_modules must be a module set (kohya, full, 3x3) or a non-empty list of module names, got 'everything'"),
    ("background", "pink", "background must be a colour like '#ffffff', got 'pink'"),
])
def test_each_kind_of_setting_is_checked_from_its_declaration(setting: str, value: object, message: str) -> None:
    assert BY_NAME[setting].problem(value) == message
    with pytest.raises(TrainingError, match="invalid training config: .*" + message.replace("[", r"\[")
                       .replace("(", r"\(").replace(")", r"\)")):
        resolve_config("sd15", config={setting: value})


def test_a_kohya_config_and_kohya_flags_use_the_declared_names() -> None:
    cfg = resolve_config("sd15", config={"network_dim": 8, "learning_rate": 3e-4, "train_batch_size": 2,
                                         "ip_noise_gamma": 0.05})
    assert (cfg["rank"], cfg["lr"], cfg["batch_size"], cfg["ip_noise_gamma"]) == (8, 3e-4, 2, 0.05)
    assert canonical_name("max_train_epochs") == "epochs"
    assert kohya_flag_values({"batch_size": 2, "epochs": 3, "ip_noise_gamma": 0.1}) == \
        {"train_batch_size": 2, "max_train_epochs": 3, "ip_noise_gamma": 0.1}


def test_resume_safe_settings_may_differ_and_the_others_may_not() -> None:
    a = resolve_config("sd15")
    assert numeric_config_diff(a, {**a, "save_state_every": 7, "sample_prompts": ["x"]}) == []
    assert numeric_config_diff(a, {**a, "ip_noise_gamma": 0.1, "rank": 4}) == ["ip_noise_gamma", "rank"]


def test_a_new_setting_is_one_declaration() -> None:
    # What a declaration must say for every derived table to pick it up: nothing more than these fields.
    s = Setting("example", 2, "int", "an example", "output", bound="positive", flag="--example", wizard="example")
    assert s.problem(2) is None and s.problem(0) == "example must be a positive integer, got 0"


# ---- loss_step on the tiny UNet --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd15():
    from diffusers import DDPMScheduler

    from lorakit.models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    return pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)


def test_loss_step_is_seeded_by_its_generator_and_each_option_changes_it(tiny_sd15) -> None:
    import torch

    from lorakit.families import Objective
    from lorakit.train.recipe import loss_step

    unet, scheduler = tiny_sd15
    latents = torch.randn((2, unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(1))
    conditioning = {"encoder_hidden_states": torch.randn((2, 77, unet.config.cross_attention_dim),
                                                         generator=torch.Generator().manual_seed(2))}

    def loss(seed: int = 0, **options) -> float:
        with torch.no_grad():
            value = loss_step(unet, Objective(), scheduler, latents, conditioning, torch.Generator().manual_seed(seed),
                              **options)
        assert value.shape == () and torch.isfinite(value)
        return value.item()

    plain = loss()
    assert loss() == plain and loss(seed=1) != plain
    # Options left at their "off" values draw nothing extra: the same numbers as without them.
    assert loss(noise_offset=0.0, ip_noise_gamma=0.0, min_snr_gamma=None) == plain
    for option in ({"noise_offset": 0.1}, {"ip_noise_gamma": 0.1}, {"min_snr_gamma": 0.01}):  # a small gamma caps every weight
        assert loss(**option) != plain, option
