"""Every boolean field of every method config is type-checked: a truthy string never reads as True."""

import dataclasses

import pytest

import fvdiffusion as fv
from fvdiffusion.samplers import ConfigError, make_config


def _bool_fields(method):
    cls = fv.METHODS[method].config_class
    return [f.name for f in dataclasses.fields(cls) if str(f.type).startswith("bool")]


@pytest.mark.parametrize("method", sorted(fv.METHODS))
def test_bool_fields_reject_strings_and_ints(method):
    for name in _bool_fields(method):
        for bad in ("False", "true", 0, 1):
            with pytest.raises(ConfigError, match=name):
                make_config(method, **{name: bad})
        make_config(method, **{name: False})


def test_the_methods_with_final_selection_are_covered():
    have = [m for m in fv.METHODS if "final_selection" in _bool_fields(m)]
    assert {"smc", "vasr", "fvd"} <= set(have)


def test_seed_beyond_64_bits_is_a_config_error():
    with pytest.raises(ConfigError, match="seed"):
        make_config("fvd", seed=2**63)
    make_config("fvd", seed=2**63 - 1)
