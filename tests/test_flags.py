"""--delta-modules syntaxes and how the delta flags become vLLM engine settings."""

import argparse
import json

import pytest

from deltadq_vllm import engine_flags
from deltadq_vllm.delta_modules import (DeltaModule, base_served_names,
                                        parse_delta_modules, validate_delta_name)
from deltadq_vllm.errors import DeltaDQError


def test_pair_syntaxes_and_json_agree():
    want = [DeltaModule("math", "/d/math"), DeltaModule("code", "/d/code")]
    assert parse_delta_modules(["math=/d/math,code=/d/code"]) == want
    assert parse_delta_modules(["math=/d/math", "code=/d/code"]) == want
    assert parse_delta_modules([" math = /d/math , code=/d/code ,"]) == want
    assert parse_delta_modules(['{"name": "math", "path": "/d/math"}',
                                '{"name": "code", "path": "/d/code"}']) == want
    assert parse_delta_modules([json.dumps([{"name": "math", "path": "/d/math"},
                                            {"name": "code", "path": "/d/code",
                                             "base_model_name": "b"}])]) == want
    assert parse_delta_modules(["math=/d/math", '{"name": "code", "path": "/d/code"}']) == want
    # paths may contain '='
    assert parse_delta_modules(["x=/a=b"]) == [DeltaModule("x", "/a=b")]


@pytest.mark.parametrize("items,needle", [
    (["math"], "not name=path"),
    (["math=/a,math=/b"], "used twice"),
    (["=/a"], "invalid fine-tune name"),
    (["-x=/a"], "invalid fine-tune name"),
    (["a b=/a"], "invalid fine-tune name"),
    (["math="], "empty path"),
    (['{"name": "m"}'], "\"name\" and \"path\""),
    (['{"name": "m", "path": "/p", "rank": 8}'], "unknown fields"),
    (['{"name": "m", "path": '], "not valid JSON"),
])
def test_bad_specs_name_the_problem_and_fix(items, needle):
    with pytest.raises(DeltaDQError) as e:
        parse_delta_modules(items)
    assert needle in str(e.value) and "fix:" in str(e.value)


def test_name_of_base_is_refused():
    with pytest.raises(DeltaDQError, match="name the base model is served under"):
        parse_delta_modules(["base=/d"], base_names=("base",))


@pytest.mark.parametrize("name", ["bad name\n<script>", "math\n", "a b", "x" * 201, "",
                                  "-x", "<b>", "m\u00e9", "a\tb", "a;b"])
def test_one_name_rule_for_static_and_runtime_names(name):
    with pytest.raises(DeltaDQError) as e:
        validate_delta_name(name, (), source="POST /v1/load_delta")
    assert "fix:" in str(e.value)


def test_valid_names_pass_and_base_names_come_from_served_model_name():
    for name in ("math", "org/model-v2.1", "a:b@c+d", "x" * 200):
        assert validate_delta_name(name) == name
    ns = argparse.Namespace(model="/m/base", served_model_name=None)
    assert base_served_names(ns) == ("/m/base",)
    ns.served_model_name = ["base", "b2"]
    assert base_served_names(ns) == ("base", "b2")
    with pytest.raises(DeltaDQError, match="served under"):
        validate_delta_name("b2", base_served_names(ns))


def _parser():
    p = argparse.ArgumentParser(exit_on_error=False)
    # the vLLM flags translate() writes to
    p.add_argument("--additional-config", type=json.loads, default={})
    p.add_argument("--lora-modules", nargs="+", default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--model", default=None)
    engine_flags.add_delta_args(p)
    engine_flags.add_delta_args(p)  # idempotent
    return p


def test_flag_action_parses_and_rejects_duplicates_across_items():
    p = _parser()
    a = p.parse_args(["--delta-modules", "a=/x,b=/y", "c=/z"])
    assert [m.name for m in a.delta_modules] == ["a", "b", "c"]
    with pytest.raises(argparse.ArgumentError, match="used twice"):
        p.parse_args(["--delta-modules", "a=/x", "--delta-modules", "a=/y"])


def test_translate_sets_lora_plumbing_and_keeps_user_config(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    p = _parser()
    a = p.parse_args(["--delta-modules", "a=/x,b=/y,c=/z", "--additional-config",
                      '{"other": 1}'])
    engine_flags.translate(a)
    assert a.enable_lora and a.max_loras == 3 and a.max_cpu_loras == 3
    assert not a.enforce_eager  # nothing forced: the user's compilation flags stand
    assert a.additional_config["other"] == 1
    settings = a.additional_config["deltadq"]
    assert settings["cpu_strategy"] == "merged" and settings["arena_reserve_mb"] == 0
    assert settings["delta_paths"] == ["/x", "/y", "/z"]   # sizes the default arena
    import os
    plugins = os.environ["VLLM_PLUGINS"].split(",")
    assert "deltadq" in plugins and "deltadq_api" in plugins
    # every other installed general plugin stays allowed
    from deltadq_vllm.vllm_compat import general_plugin_names
    assert set(general_plugin_names()) <= set(plugins)


def test_translate_slot_defaults_and_errors():
    p = _parser()
    many = ",".join(f"f{i}=/p{i}" for i in range(20))
    a = p.parse_args(["--delta-modules", many])
    engine_flags.translate(a)
    assert a.max_loras == engine_flags.DEFAULT_MAX_DELTAS_CAP and a.max_cpu_loras == 20
    a = p.parse_args(["--delta-modules", "a=/x", "--max-deltas", "4", "--max-cpu-deltas", "2"])
    with pytest.raises(DeltaDQError, match="max-cpu-deltas"):
        engine_flags.translate(a)
    a = p.parse_args(["--delta-modules", "a=/x", "--lora-modules", "l=/l"])
    with pytest.raises(DeltaDQError, match="cannot be combined"):
        engine_flags.translate(a)
    a = p.parse_args(["--enable-runtime-deltas"])
    with pytest.raises(DeltaDQError, match="--delta-root"):
        engine_flags.translate(a)
    a = p.parse_args(["--delta-modules", "a=/x"])
    a.speculative_config = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(DeltaDQError, match="speculative decoding"):
        engine_flags.translate(a)
    a = p.parse_args(["--delta-modules", "a=/x"])
    a.enable_batch_sharded_sampling = True
    with pytest.raises(DeltaDQError, match="batch-sharded"):
        engine_flags.translate(a)
    a = p.parse_args([])
    engine_flags.translate(a)  # no deltas: nothing changes
    assert not hasattr(a, "enable_lora")


def test_translate_refuses_a_name_of_the_base_before_any_engine_starts():
    p = _parser()
    p.add_argument("--served-model-name", nargs="+", default=None)
    a = p.parse_args(["--model", "org/base", "--delta-modules", "org/base=/d/x"])
    with pytest.raises(DeltaDQError, match="served under"):
        engine_flags.translate(a)
    a = p.parse_args(["--model", "/m/base", "--served-model-name", "chat",
                      "--delta-modules", "chat=/d/x"])
    with pytest.raises(DeltaDQError, match="--served-model-name"):
        engine_flags.translate(a)
