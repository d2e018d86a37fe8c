"""RunConfig's field declarations are the one place every list of options is read from."""

from dataclasses import fields

import pytest

from gradcent.experiments.config import (
    LOGISTICS,
    NUMBERS,
    PLAN,
    SWEEPABLE,
    RunConfig,
    flag_options,
    from_preset,
    option,
    option_choices,
    option_type,
    options_with_role,
    resolve,
)
from gradcent.experiments.presets import Preset, get_preset
from gradcent.experiments.train import numeric_config


def test_every_field_is_declared_with_option_and_a_role():
    for f in fields(RunConfig):
        assert f.metadata["role"] in (NUMBERS, PLAN, LOGISTICS), f.name
        assert (f.metadata["flag"] is None) != (f.metadata["no_flag"] is None), f.name
    roles = options_with_role(NUMBERS) + options_with_role(PLAN) + options_with_role(LOGISTICS)
    assert sorted(roles) == sorted(f.name for f in fields(RunConfig))


def test_the_options_a_checkpoint_need_not_match_are_the_ones_older_runs_stored():
    # numeric_config is what a checkpoint stores and a resume compares: runs
    # written before the roles were declared must still resume, so this set is pinned.
    others = set(options_with_role(PLAN)) | set(options_with_role(LOGISTICS))
    assert others == {
        "quiet",
        "workers",
        "variants",
        "seeds",
        "sweep",
        "preset",
        "paper_table",
        "download",
    }
    cfg = resolve(None, lr=0.1, seeds=(3,), quiet=True)
    assert numeric_config(cfg) == {k: v for k, v in cfg.to_dict().items() if k not in others}
    assert list(numeric_config(cfg)) == list(options_with_role(NUMBERS))


def test_sweep_points_change_only_numbers():
    assert SWEEPABLE == {
        "model",
        "norm",
        "ws",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "epochs",
        "batch_size",
        "milestones",
        "gamma",
        "gc_mode",
    }
    assert SWEEPABLE <= set(options_with_role(NUMBERS))
    with pytest.raises(ValueError, match=r"Invalid sweep keys: \['seeds'\]"):
        resolve(None, sweep={"a": {"seeds": (1,)}})


def test_an_option_needs_a_flag_or_a_reason_and_a_known_role():
    with pytest.raises(TypeError, match="flag="):
        option(1)
    with pytest.raises(TypeError, match="flag="):
        option(1, flag="help", no_flag="why not")
    with pytest.raises(TypeError, match="Invalid option role: 'other'"):
        option(1, flag="help", role="other")


def test_option_types_drop_none():
    assert [option_type(n) for n in ("subset", "lr_pretrained", "model", "ws")] == [
        int,
        float,
        str,
        bool,
    ]
    assert option_type("milestones") == tuple[int, ...]
    assert option_type("variants") == tuple[str, ...]
    with pytest.raises(KeyError):
        option_type("seed")


def test_only_impl_has_a_closed_list_at_the_flag():
    import gradcent.optim

    assert option_choices("impl") == gradcent.optim.IMPLS
    assert [n for n in flag_options() if option_choices(n)] == ["impl"]


def test_flags_are_the_fields_not_declared_without_one():
    no_flag = {f.name for f in fields(RunConfig)} - set(flag_options())
    assert no_flag == {"paper_table", "deterministic"}
    assert all(text for text in flag_options().values())


def test_a_preset_sets_config_options_and_its_own_description():
    preset_only = {f.name for f in fields(Preset)} - {f.name for f in fields(RunConfig)}
    assert preset_only == {"name", "description", "paper_key", "paper_runs"}


def test_from_preset_copies_what_the_preset_sets():
    opts = from_preset(get_preset("table7-cub"))
    assert (opts["preset"], opts["fine_grained"], opts["lr_pretrained"]) == (
        "table7-cub",
        True,
        0.01,
    )
    # None in a preset keeps the config's default
    assert get_preset("table7-cub").seeds is None and "seeds" not in opts
    assert resolve(get_preset("table7-cub")).seeds == RunConfig().seeds
    assert from_preset(get_preset("fmnist-table1"))["seeds"] == (0, 1, 2, 3, 4)
