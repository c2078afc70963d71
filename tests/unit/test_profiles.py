"""The launch profiles: DeepSpeed JSONs that DeepSpeed's own parser accepts (with the "auto" values
Accelerate fills), accelerate YAMLs that `accelerate launch --config_file` loads, and the plugin crb
builds from a profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml

from crb.engine.profiles import LAUNCH, PROFILES, choose, deepspeed_plugin
from crb.errors import CrbError
from crb.recipe import schema as recipes

ROOT = Path(__file__).resolve().parents[2]
DS_JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))


def filled(path: Path, micro: int = 2, accum: int = 4, world: int = 1) -> dict:
    """The JSON with Accelerate's "auto" values set, as accelerator.prepare does."""
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                  train_batch_size=micro * accum * world, gradient_clipping=1.0,
                  bf16={"enabled": True}, fp16={"enabled": False})
    return config


def test_every_deepspeed_profile_has_a_json_and_every_json_a_profile():
    assert {p.deepspeed_json for p in PROFILES.values() if p.deepspeed_json} == set(DS_JSONS)


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.stem)
def test_deepspeed_parses_the_profile(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    profile = PROFILES[path.stem]
    ds = DeepSpeedConfig(filled(path))
    assert ds.zero_optimization_stage == profile.zero_stage
    assert (ds.zero_config.offload_optimizer is not None) == profile.offload_optimizer
    assert (ds.zero_config.offload_param is not None) == profile.offload_params
    assert ds.train_batch_size == 8


def test_deepspeed_parser_rejects_a_broken_profile():
    """The check above can fail: DeepSpeed's parser refuses a bad device and an inconsistent batch."""
    from deepspeed.runtime.config import DeepSpeedConfig

    bad = filled(LAUNCH / "deepspeed" / "zero2-offload.json")
    bad["zero_optimization"]["offload_optimizer"]["device"] = "gpu0"
    with pytest.raises(Exception, match="device"):
        DeepSpeedConfig(bad)
    wrong = filled(LAUNCH / "deepspeed" / "zero2.json")
    wrong["train_batch_size"] = 7
    with pytest.raises(AssertionError, match="batch"):
        DeepSpeedConfig(wrong)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_accelerate_loads_the_launch_config(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    if path.stem == "plain":
        assert cfg.distributed_type == DistributedType.NO and cfg.num_processes == 1
        return
    if path.stem == "multi-node":  # plain DDP over machines: one rendezvous address, this node's rank
        assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_machines == 2
        assert cfg.machine_rank == 0 and cfg.main_process_ip and cfg.main_process_port
        return
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    # With a deepspeed_config_file, Accelerate's plugin refuses a run whose accelerate config also sets these
    # (DeepSpeedPlugin._deepspeed_config_checks); the ZeRO-3 ones are launched in test_deepspeed.py
    raw = yaml.safe_load(path.read_text())
    refused = {"mixed_precision", "gradient_accumulation_steps", "gradient_clipping", "zero_stage",
               "offload_optimizer_device", "offload_param_device", "zero3_save_16bit_model"}
    assert not refused & (raw.keys() | raw["deepspeed_config"].keys()), path.name
    assert raw["deepspeed_config"]["zero3_init_flag"] is ("zero3" in path.stem)  # ZeRO-3 shards as it loads
    ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert ds_file.is_file() and ds_file.stem in PROFILES
    if path.stem == "multi-node-zero3":  # one launcher per node (not pdsh from node 0), as multi-node.yaml
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard" and cfg.num_machines == 2
        assert cfg.main_process_ip and cfg.main_process_port and ds_file.stem == "zero3"
        return
    multi = path.stem.startswith("multi-gpu")
    assert cfg.num_processes == (2 if multi else 1)
    assert ds_file.stem == (path.stem.removeprefix("multi-gpu-") if multi else path.stem)


def test_plugin_carries_crb_accumulation_and_clipping():
    plugin = deepspeed_plugin(PROFILES["zero2-offload"], grad_accum=8, max_grad_norm=0.5)
    c = plugin.deepspeed_config
    assert c["gradient_accumulation_steps"] == 8 and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert deepspeed_plugin(PROFILES["plain"], 8, 0.5) is None


def test_recipe_accepts_exactly_the_profiles():
    assert set(get_args(recipes.ProfileName)) == {"auto", *PROFILES}


def test_unknown_profile_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(CrbError, match=r"hardware\.profile.*zero9"):
        choose("zero9", lambda p: 0.0, None, 1)
    toml = tmp_path / "r.toml"
    toml.write_text('extends = "{}"\n[hardware]\nprofile = "zero9"\n'.format(ROOT / "recipes" / "code.toml"))
    with pytest.raises(CrbError, match=r"r\.toml:3: hardware\.profile.*'zero2-offload'"):
        recipes.load(toml)
