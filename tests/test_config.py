"""The config parser: every value of the wrong type or range is a ConfigError naming the key, what it
expects and what it got — found by fuzzing overrides and config files, never a raw TypeError later."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petal_fast.config import ConfigError, DataConfig, TrainConfig, load_config

KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "data"] + \
       [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALUE_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(
    ["0", "-1", "1.5", "1e999", "nan", "true", "none", "[]", "[1]", "[1, 2]", "[1, 2, 3]", "{}", "{'a': 1}",
     "'x'", "()", "[[[[[[1]]]]]]", "1" * 5000, "[" * 200, "b'x'", "{1, 2}", "2**64"]))


@pytest.mark.parametrize("word, expect", [
    ("lr=fast", "lr must be a number; got 'fast'"),
    ("batch_size=2.5", "batch_size must be an integer; got 2.5"),
    ("batch_size=0", "batch_size must be an integer >= 1; got 0"),
    ("epochs=-3", "epochs must be an integer >= 1"),
    ("progress=1", "progress must be true/false; got 1"),
    ("dropout=1", "dropout must be a finite number in [0, 1)"),
    ("sample_rate=0", "sample_rate must be a finite number in (0, 1]"),
    ("lr=1e999", "lr must be a finite number > 0; got inf"),
    ("warmup=2.5", "warmup must be a fraction"),
    ("margins=[1, 2]", "margins must be a list of 3 numbers or none"),
    ("data.resolution=[32, 12]", "data.resolution must be (low, high)"),
    ("data.kind=lmdb", "data.kind must be one of synthetic, recordio, imagefolder; got 'lmdb'"),
    ("data=3", "config key 'data' is a table of keys"),
    ("lr.x=1", "unknown config key 'lr.x'"),
    ("data.foo=1", "unknown config key 'data.foo'"),
    ("num_classes=1", "num_classes must be an integer >= 2"),
    ("device=gpu0", "device must be auto, cpu, cuda or cuda:N"),
    ("targets=[]", "targets must name at least one layer"),
    ("=3", "must look like key=value"),
])
def test_bad_values_name_key_expected_and_got(word, expect):
    with pytest.raises(ConfigError) as err:
        load_config(None, [word])
    assert expect in str(err.value)


def test_string_fields_keep_their_text_and_types_convert():
    cfg = load_config(None, ["output=2024", "data.path=007", "lr=1", "targets=attn.qkv", "num_classes=10"])
    assert cfg.output == "2024" and cfg.data.path == "007"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.targets == ("attn.qkv",) and cfg.num_classes == 10
    with pytest.raises(ConfigError, match="rank must be an integer; got '8'"):
        load_config(None, [], rank="8")  # keyword arguments are not parsed: their type is checked
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        TrainConfig(batch_size="64").validate()


@pytest.mark.parametrize("suffix, text, expect", [
    (".toml", "lr = \n", "is not valid TOML"),
    (".json", "{lr: 1}", "is not valid JSON"),
    (".json", "[1, 2]", "must hold a table of keys at the top level"),
    (".toml", "[data]\nresolution = 'big'\n", "data.resolution must be a list of 2 integers"),
    (".toml", "data = 5\n", "config key 'data' is a table of keys"),
])
def test_bad_config_files_name_the_file(tmp_path, suffix, text, expect):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expect in str(err.value) and (str(path) in str(err.value) or "data" in expect)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def _check(fn) -> None:
    try:
        cfg = fn()
    except ConfigError as err:
        assert str(err)
        return
    except FileNotFoundError:
        return
    assert isinstance(cfg, TrainConfig)
    cfg.validate()  # what comes back is valid and stays valid


@FUZZ
@given(words=st.lists(st.tuples(st.sampled_from(KEYS + ["bogus", "data", "data.", ".x", "lr.y", ""]), VALUE_TEXT),
                      max_size=4))
def test_fuzz_overrides(words):
    _check(lambda: load_config(None, [f"{k}={v}" for k, v in words]))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)


@FUZZ
@given(values=st.dictionaries(st.sampled_from(KEYS + ["data", "bogus"]), JSON_VALUES, max_size=4))
def test_fuzz_json_files(tmp_path, values):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    _check(lambda: load_config(path))


@FUZZ
@given(text=st.text(max_size=120))
def test_fuzz_toml_text(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    _check(lambda: load_config(path))
