"""Weights are verified before use: content hash from the model card, bounded header config
checked before any network is built, keys/shapes/values named, and exports that validate
in a temporary file before they atomically replace anything (issue 10, items 2 and 7)."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fvdiffusion.zoo import loaders
from fvdiffusion.zoo.loaders import (
    FORMAT,
    WEIGHTS_DIR,
    WeightsError,
    load_ddpm,
    load_module,
    recorded_hash,
    sha256_of,
    write_weights,
)
from fvdiffusion.zoo.unet import UNet
from tiny_models import TINY_UNET

N_FLIPS = 2_000


# --- helpers ------------------------------------------------------------------------------

def _layout(path: Path) -> tuple[int, dict]:
    """(start of the data section, the header's tensor table) of a safetensors file."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, header


def _flip(path: Path, byte_in_float: int, mask: int, n: int = N_FLIPS, seed: int = 0) -> None:
    """XOR ``mask`` into byte ``byte_in_float`` (0 = lowest mantissa byte, 3 = sign/exponent) of ``n``
    distinct float32 values in the data section."""
    start, _ = _layout(path)
    data = bytearray(path.read_bytes())
    n_floats = (len(data) - start) // 4
    for index in random.Random(seed).sample(range(n_floats), n):
        data[start + 4 * index + byte_in_float] ^= mask
    path.write_bytes(bytes(data))


def _copy_ddpm(dest: Path, with_card: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(WEIGHTS_DIR / "ddpm.safetensors", dest)
    if with_card:
        shutil.copy(WEIGHTS_DIR / "ddpm.md", dest)
    return dest / "ddpm.safetensors"


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --- the content hash ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(loaders.WEIGHT_FILES))
def test_every_shipped_card_records_the_files_sha256(kind):
    path = loaders.default_path(kind)
    assert recorded_hash(path.with_suffix(".md")) == sha256_of(path)


def test_flipped_finite_bytes_are_caught_by_the_cards_hash(tmp_path):
    weights = _copy_ddpm(tmp_path / "w", with_card=True)
    _flip(weights, byte_in_float=0, mask=0xFF)  # low mantissa bits only: every value stays finite and small
    with pytest.raises(WeightsError) as err:
        load_ddpm(weights)
    message = _one_line(err)
    assert str(weights) in message and "SHA-256" in message and "ddpm.md" in message


def test_without_a_card_finite_flips_cannot_be_detected_but_exponent_flips_and_nan_are(tmp_path):
    # the documented limit: low-bit corruption of an uncarded file is indistinguishable from training
    from fvdiffusion.errors import UnverifiedWeightsWarning

    quiet = _copy_ddpm(tmp_path / "quiet", with_card=False)
    _flip(quiet, byte_in_float=0, mask=0xFF)
    with pytest.warns(UnverifiedWeightsWarning, match="no model card recording its SHA-256"):
        load_ddpm(quiet)  # loads, but says it could not be verified
    # exponent flips blow values up past the plausibility bound (or to inf)
    loud = _copy_ddpm(tmp_path / "loud", with_card=False)
    _flip(loud, byte_in_float=3, mask=0x40)
    with pytest.raises(WeightsError) as err:
        load_ddpm(loud)
    assert str(loud) in _one_line(err)
    # a NaN names the file and the tensor
    nan = _copy_ddpm(tmp_path / "nan", with_card=False)
    start, table = _layout(nan)
    name, entry = min(table.items(), key=lambda kv: kv[1]["data_offsets"][0])
    data = bytearray(nan.read_bytes())
    offset = start + entry["data_offsets"][0]
    data[offset:offset + 4] = struct.pack("<f", float("nan"))
    nan.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="NaN or inf") as err:
        load_ddpm(nan)
    assert str(nan) in _one_line(err) and name in str(err.value)


def test_nan_in_a_carded_file_fails_on_the_hash_first(tmp_path):
    weights = _copy_ddpm(tmp_path / "w", with_card=True)
    _flip(weights, byte_in_float=3, mask=0x7F)  # 0x7F in the top byte: many NaN/inf values
    with pytest.raises(WeightsError, match="SHA-256") as err:
        load_ddpm(weights)
    assert str(weights) in _one_line(err)


def test_shipped_weights_are_checked_against_their_card(tmp_path, monkeypatch):
    shipped = tmp_path / "pkg"
    shutil.copytree(WEIGHTS_DIR, shipped)
    monkeypatch.setattr(loaders, "WEIGHTS_DIR", shipped)
    load_ddpm()  # intact copy: loads
    _flip(shipped / "ddpm.safetensors", byte_in_float=0, mask=0x01, n=1)
    with pytest.raises(WeightsError, match="reinstall fvdiffusion") as err:
        load_ddpm()
    assert str(shipped / "ddpm.safetensors") in _one_line(err)
    # a shipped file whose card lost its hash is refused too (an uncarded shipped file cannot be verified)
    card = shipped / "eval_net.md"
    card.write_text("\n".join(line for line in card.read_text().splitlines() if "SHA-256**" not in line))
    with pytest.raises(WeightsError, match="records no SHA-256"):
        loaders.load_eval_net()


def test_sample_cli_refuses_flipped_weights_in_weights_dir(tmp_path):
    from typer.testing import CliRunner

    from fvdiffusion.cli import app

    weights_dir = tmp_path / "w"
    shutil.copytree(WEIGHTS_DIR, weights_dir)
    _flip(weights_dir / "ddpm.safetensors", byte_in_float=0, mask=0xFF)
    result = CliRunner().invoke(app, ["sample", "--weights-dir", str(weights_dir), "--out", str(tmp_path / "o"),
                                      "--particles", "4", "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "ddpm.safetensors" in result.output and "SHA-256" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o" / "metrics.json").exists()


# --- the header: bounded config, checked before anything is built ------------------------

def _crafted(path: Path, kind: str, config: dict, tensors: dict | None = None) -> Path:
    save_file(tensors or {"x": torch.zeros(1)}, str(path),
              metadata={"format": FORMAT, "kind": kind, "config": json.dumps(config)})
    return path


@pytest.fixture
def no_real_build(monkeypatch):
    """Fail if a zoo network is constructed anywhere but on the meta device (that would allocate)."""
    built = []
    for cls in (UNet, *(arch for arch, _ in loaders._ARCHITECTURES.values() if arch is not UNet)):
        original = cls.__init__

        def spy(self, config=None, _original=original, _cls=cls):
            if not torch.empty(0).is_meta:
                raise AssertionError(f"{_cls.__name__} built from an unchecked header config {config}")
            built.append(config)
            _original(self, config)

        monkeypatch.setattr(cls, "__init__", spy)
    return built


@pytest.mark.parametrize("field, value", [
    ("base_channels", 100_000),
    ("num_res_blocks", 10_000),
    ("channel_mults", [1, 2, 2, 2, 2, 2, 2]),
    ("channel_mults", [1, 4096]),
    ("num_heads", 0),
    ("attention", "yes"),
    ("dropout", 1.5),
    ("in_channels", 3),
])
def test_a_huge_or_bad_header_config_is_refused_before_any_network_is_built(tmp_path, no_real_build, field, value):
    config = {**TINY_UNET.to_dict(), field: value}
    path = _crafted(tmp_path / "evil.safetensors", "ddpm", config)
    assert path.stat().st_size < 1000  # a few hundred bytes asking for gigabytes
    with pytest.raises(WeightsError) as err:
        load_ddpm(path)
    message = _one_line(err)
    assert str(path) in message and f"{field}=" in message
    assert no_real_build == []  # not even on the meta device


def test_in_bounds_fields_whose_product_is_huge_are_refused_on_the_meta_device(tmp_path, no_real_build):
    config = {**TINY_UNET.to_dict(), "base_channels": 256, "channel_mults": [16, 16, 16], "num_res_blocks": 8,
              "num_groups": 8}
    path = _crafted(tmp_path / "evil.safetensors", "ddpm", config)
    with pytest.raises(WeightsError, match="parameters, over the") as err:
        load_ddpm(path)
    assert str(path) in _one_line(err)
    assert len(no_real_build) == 1  # built once, on meta: nothing allocated


def test_unknown_config_fields_and_non_object_configs_are_named(tmp_path):
    path = _crafted(tmp_path / "a.safetensors", "ddpm", {**TINY_UNET.to_dict(), "evil": 1})
    with pytest.raises(WeightsError, match="unknown field.*'evil'"):
        load_ddpm(path)
    path = _crafted(tmp_path / "b.safetensors", "eval_net", [1, 2])
    with pytest.raises(WeightsError, match="not a JSON object"):
        loaders.load_eval_net(path)


def test_wrong_keys_shapes_and_dtypes_are_named_from_the_header(tmp_path, no_real_build):
    with torch.device("meta"):
        expected = UNet(TINY_UNET).state_dict()
    good = {k: torch.zeros(v.shape) for k, v in expected.items()}
    path = tmp_path / "w.safetensors"

    _crafted(path, "ddpm", TINY_UNET.to_dict(), {**good, "stem.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightsError, match=r"stem.weight has shape \(3, 3\), expected \(8, 1, 3, 3\)") as err:
        load_ddpm(path)
    assert str(path) in _one_line(err)

    renamed = dict(good)
    renamed["extra.weight"] = renamed.pop("head.2.weight")
    _crafted(path, "ddpm", TINY_UNET.to_dict(), renamed)
    with pytest.raises(WeightsError, match=r"missing head.2.weight, unexpected extra.weight"):
        load_ddpm(path)

    _crafted(path, "ddpm", TINY_UNET.to_dict(), {**good, "stem.bias": torch.zeros(8, dtype=torch.int64)})
    with pytest.raises(WeightsError, match="stem.bias has dtype I64"):
        load_ddpm(path)

    _crafted(path, "ddpm", TINY_UNET.to_dict(), good)
    assert isinstance(load_ddpm(path).module, UNet)  # the same header, right tensors: loads


def test_a_loaded_network_holds_the_files_values_on_a_real_device(tmp_path):
    torch.manual_seed(0)
    net = UNet(TINY_UNET)
    torch.nn.init.normal_(net.head[-1].weight)
    path = write_weights(net, "ddpm", tmp_path / "d.safetensors")
    loaded = load_module("ddpm", path)
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert not tensor.is_meta and not tensor.requires_grad, name
        assert torch.equal(tensor, net.state_dict()[name])


# --- exports: validate in a temporary file, then replace atomically ----------------------

def _run_dir(tmp_path: Path, edit=None) -> Path:
    """A one-step DDPM run (tiny UNet) whose EMA weights are ``edit``-ed."""
    from fvdiffusion.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model, ema = UNet(TINY_UNET), UNet(TINY_UNET)
    if edit is not None:
        with torch.no_grad():
            edit(ema)
    run = tmp_path / "run"
    meta = {"kind": "ddpm", "config": {"model": TINY_UNET.to_dict()}, "loss": 0.5, "num_train_images": 10,
            "device": "cpu", "elapsed_s": 1.0, "command": "test"}
    save_checkpoint(run, 1, meta, model, torch.optim.AdamW(model.parameters()), torch.Generator().manual_seed(0),
                    ema=ema)
    return run


@pytest.fixture
def reference_data():
    from fvdiffusion.errors import DataMissingError
    from fvdiffusion.zoo.mnist_data import load_mnist

    try:
        return load_mnist("reference")
    except DataMissingError as err:
        pytest.skip(f"MNIST data not installed ({err})")


def _occupied_dest(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    dest = tmp_path / "dest"
    _copy_ddpm(dest, with_card=True)
    return dest, {p.name: p.read_bytes() for p in dest.iterdir()}


def _assert_untouched(dest: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # same files, same bytes, no leftovers


def test_export_writes_a_verified_card_and_the_file_loads_against_it(tmp_path, reference_data):
    from fvdiffusion.train.export import export_run

    dest, _ = _occupied_dest(tmp_path)
    result = export_run("ddpm", _run_dir(tmp_path), out_dir=dest)
    assert result.weights == dest / "ddpm.safetensors" and result.card == dest / "ddpm.md"
    assert recorded_hash(result.card) == sha256_of(result.weights)
    assert sorted(p.name for p in dest.iterdir()) == ["ddpm.md", "ddpm.safetensors"]
    load_ddpm(result.weights)  # checked against the new card
    _flip(result.weights, byte_in_float=0, mask=0x01, n=1)
    with pytest.raises(WeightsError, match="SHA-256"):
        load_ddpm(result.weights)


@pytest.mark.parametrize("edit, fp16, needle", [
    (lambda m: m.stem.weight.fill_(float("nan")), False, "NaN"),
    (lambda m: m.stem.bias.fill_(1e5), True, "NaN or inf"),  # finite in float32, inf once stored as float16
    (lambda m: m.stem.bias.fill_(1e5), False, "plausibility"),
    (lambda m: m.head[-1].bias.fill_(30.0), False, "eps-MSE"),  # finite, small weights, useless network
])
def test_a_bad_export_leaves_the_destination_untouched(tmp_path, reference_data, edit, fp16, needle):
    from fvdiffusion.train.export import export_run

    dest, before = _occupied_dest(tmp_path)
    run = _run_dir(tmp_path, edit)
    with pytest.raises(ValueError, match=needle) as err:  # WeightsError (or the checkpoint's own NaN check)
        export_run("ddpm", run, out_dir=dest, fp16=fp16)
    assert "\n" not in str(err.value)
    _assert_untouched(dest, before)


def test_export_into_the_package_weights_folder_validates_and_verifies(tmp_path, reference_data, monkeypatch):
    # the documented recipe exports straight into zoo/weights, where every file counts as shipped and
    # needs a card: the export must validate its staged file elsewhere, then ship a verified pair
    from fvdiffusion.train.export import export_run

    shipped = tmp_path / "pkg"
    shutil.copytree(WEIGHTS_DIR, shipped)
    monkeypatch.setattr(loaders, "WEIGHTS_DIR", shipped)
    before = sorted(p.name for p in shipped.iterdir())
    result = export_run("ddpm", _run_dir(tmp_path), out_dir=shipped)
    assert result.weights == shipped / "ddpm.safetensors" and loaders.is_shipped(result.weights)
    assert sorted(p.name for p in shipped.iterdir()) == before  # replaced in place, no staging left behind
    assert isinstance(load_ddpm().module, UNet)  # the shipped default, checked against its new card


def test_export_has_no_default_destination(tmp_path):
    from typer.testing import CliRunner

    from fvdiffusion.cli import app
    from fvdiffusion.train.export import export_run

    with pytest.raises(ValueError, match="out_dir is required"):
        export_run("ddpm", tmp_path, out_dir=None)
    result = CliRunner().invoke(app, ["train", "export", "--kind", "ddpm", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "--out" in result.output and "Traceback" not in result.output


def test_a_carded_file_loads_without_the_unverified_warning(tmp_path):
    import warnings

    from fvdiffusion.errors import UnverifiedWeightsWarning

    carded = _copy_ddpm(tmp_path / "carded", with_card=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWeightsWarning)
        load_ddpm(carded)
        load_ddpm()  # the shipped weights
