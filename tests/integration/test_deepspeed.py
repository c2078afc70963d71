"""The DeepSpeed profiles run for real on the CPU (DeepSpeed's CPU accelerator, gloo): ZeRO-3 on 2 processes
trains like plain data parallel, and the shipped accelerate configs' ZeRO-3 (two launchers as two machines,
killed with kill -9, resumed by one) ends with the same weights bit for bit; LoRA under ZeRO-2 started with plain
`python` checkpoints only what trains and resumes; a NaN in a ZeRO-3 shard is seen; the fused loss gets the whole
output layer under ZeRO-3; an encoder under ZeRO-3 is saved whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEMO_DATA, losses, retrieval_recipe_text, subsample, write_recipe

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def crb_args(recipe: Path, out: Path, profile: str, method: str, resume: bool = False) -> list[str]:
    """`crb.run`'s arguments: 4 steps, a checkpoint each; profile "launcher": the launcher's config sets DeepSpeed."""
    sets = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=4", f"method.name='{method}'",
            f"output.dir='{out}'", *([] if profile == "launcher" else [f"hardware.profile='{profile}'"])]
    return [str(recipe), *[x for s in sets for x in ("--set", s)], *(["--resume"] if resume else [])]


def command(recipe: Path, out: Path, profile: str, method: str, processes: int, port: int, resume: bool = False,
            config: str = "multi-gpu-zero3.yaml", node: list[str] | None = None) -> list[str]:
    """crb under plain python (1 process) or torchrun; profile "launcher": `accelerate launch` with a shipped
    DeepSpeed config (launch/accelerate/`config`; `node`: this machine's rank arguments), which sets DeepSpeed
    instead of crb."""
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    if profile == "launcher":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "launch" / "accelerate" / config), "--num_processes", str(processes),
                  "--main_process_port", str(port), *(node or [])]
    return [*launch, "-m", "crb.run", *crb_args(recipe, out, profile, method, resume)]


def train(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = out / "final_model" / "model.safetensors"
    return load_file(found if found.is_file() else out / "final_adapter" / "adapter_model.safetensors")


def test_zero3_on_two_processes_trains_like_plain_and_resumes_after_kill_9(chat_recipe, tmp_path):
    """crb's own ZeRO-3 (hardware.profile) against plain data parallel; then the shipped accelerate configs' ZeRO-3
    against crb's own: two launchers as two machines (multi-node-zero3.yaml) killed with kill -9, resumed by one
    launcher of 2 processes (multi-gpu-zero3.yaml)."""
    plain, zero3, killed = tmp_path / "plain", tmp_path / "zero3", tmp_path / "killed"
    train(command(chat_recipe, plain, "plain", "full", 2, 29621))
    said = train(command(chat_recipe, zero3, "zero3", "full", 2, 29623))
    assert "profile zero3: set by hardware.profile" in said
    # every parameter counted by its full size, though ZeRO-3 partitioned it as it loaded
    assert "full: 125,248 of 125,248 parameters train" in said
    # each rank wrote its own shard of the weights and optimizer states
    shards = sorted(p.name for p in (zero3 / "checkpoints" / "step-4" / "pytorch_model").iterdir())
    assert [s for s in shards if s.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert losses(zero3) == pytest.approx(losses(plain), rel=1e-5)
    assert losses(zero3)[-1] < losses(zero3)[0]
    reference = weights(zero3)
    for k, v in weights(plain).items():
        torch.testing.assert_close(reference[k], v, atol=1e-5, rtol=1e-4)

    # two launchers with the multi-node ZeRO-3 config as two machines of one process each (the master on localhost)
    nodes = []
    for rank in (0, 1):
        cmd = command(chat_recipe, killed, "launcher", "full", 2, 29625, config="multi-node-zero3.yaml",
                      node=["--machine_rank", str(rank), "--num_machines", "2"])
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-2").is_dir():
        assert all(p.poll() is None for p in nodes) and time.time() < deadline, nodes[0].communicate()[1][-3000:]
        time.sleep(0.02)
    for p in nodes:
        os.killpg(p.pid, signal.SIGKILL)  # each machine's launcher and its rank
        p.wait(timeout=60)
    assert not (killed / "final_model").exists()
    said = train(command(chat_recipe, killed, "launcher", "full", 2, 29627, resume=True))
    assert "profile launcher: DeepSpeed set by the accelerate config" in said
    assert f"resumed from {killed / 'checkpoints' / 'step-'}" in said
    assert (killed / "checkpoints" / "step-4" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()
    got = weights(killed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_lora_under_zero2_without_a_launcher_checkpoints_the_adapter_and_resumes(chat_recipe, tmp_path):
    """Plain `python -m crb.run` with a DeepSpeed profile (no launcher: a one-process group); the checkpoint
    leaves the frozen base out, and a resume from step 2 ends with the unbroken run's adapter."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    said = train(command(chat_recipe, unbroken, "zero2", "lora", 1, 0))
    assert "profile zero2: set by hardware.profile" in said and "1 process(es)" in said
    step2 = unbroken / "checkpoints" / "step-2"
    states = torch.load(step2 / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert states and all("lora_" in k for k in states), sorted(states)[:5]
    shutil.copytree(step2, resumed / "checkpoints" / "step-2")
    said = train(command(chat_recipe, resumed, "zero2", "lora", 1, 0, resume=True))
    assert "resumed from " + str(resumed / "checkpoints" / "step-2") in said
    assert losses(resumed) == losses(unbroken)[2:]
    reference, got = weights(unbroken), weights(resumed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


NAN_CHECK = """
import torch
from accelerate import Accelerator
from crb.engine import checkpoint
from crb.engine.profiles import PROFILES, deepspeed_plugin, one_process_group
one_process_group()
acc = Accelerator(deepspeed_plugin=deepspeed_plugin(PROFILES["zero3"], 1, 1.0))
acc.state.deepspeed_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
model, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
weight = model.module[0].weight
print("outside a forward", weight.numel(), "shard", weight.ds_tensor.numel())
print("finite", checkpoint.weights_finite(acc, model))
weight.ds_tensor.data[3] = float("nan")
print("finite", checkpoint.weights_finite(acc, model))
"""


def test_a_nan_in_a_zero3_shard_is_seen():
    """Under ZeRO-3 a parameter is empty outside a forward: the finiteness check reads each rank's shard."""
    out = train([sys.executable, "-c", NAN_CHECK])
    assert "outside a forward 0 shard 4096" in out
    assert out.count("finite True") == 1 and out.count("finite False") == 1


# crb with train.kernels = "cce" on the CPU: the fused loss stood in for by the same sum in torch, and every
# weight partitioned under ZeRO-3 (a tiny model's would all stay whole, under ZeRO-3's persistence threshold)
FUSED_ON_CPU = """
import importlib.machinery, sys, types
import torch
fake = types.ModuleType("cut_cross_entropy")
fake.__spec__ = importlib.machinery.ModuleSpec("cut_cross_entropy", None)
seen = []
def linear_cross_entropy(x, w, y, ignore_index, reduction):
    seen.append((tuple(w.shape), getattr(w, "ds_persist", None)))  # ds_persist False: partitioned
    return torch.nn.functional.cross_entropy(x @ w.T, y, ignore_index=ignore_index, reduction=reduction)
fake.linear_cross_entropy = linear_cross_entropy
sys.modules["cut_cross_entropy"] = fake
import crb.engine.build as build
import crb.run
kernels, plugin = build.apply_kernels, crb.run.deepspeed_plugin
build.apply_kernels = lambda model, device, name: kernels(model, torch.device("cuda"), name)  # no CUDA is used
def every_weight_partitioned(*args, **kwargs):
    made = plugin(*args, **kwargs)
    made.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return made
crb.run.deepspeed_plugin = every_weight_partitioned
code = crb.run.main(sys.argv[1:])
print("output layer seen by the fused loss:", sorted(set(seen)))
sys.exit(code)
"""


def test_the_fused_loss_reads_the_whole_output_layer_under_zero3(chat_recipe, tmp_path):
    """The fused loss reads lm_head's weight inside the model's forward, not through lm_head's own: under ZeRO-3
    (where a weight is an empty shard outside its module's forward) DeepSpeed must gather it there."""
    plain = tmp_path / "plain"
    train(command(chat_recipe, plain, "plain", "full", 1, 0))
    fused = tmp_path / "fused"
    script = tmp_path / "fused_on_cpu.py"
    script.write_text(FUSED_ON_CPU)
    said = train([sys.executable, str(script), *crb_args(chat_recipe, fused, "zero3", "full"),
                  "--set", "train.kernels='cce'"])
    assert "cut-cross-entropy linear + cross-entropy on (mistral)" in said
    assert "output layer seen by the fused loss: [((400, 64), False)]" in said
    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)


def test_a_sentence_transformers_model_under_zero3_is_saved_whole(tmp_path, minilm):
    """An encoder writes itself (sentence-transformers' layout): under ZeRO-3 its weights are gathered for the
    write, so the saved model is the trained one, equal to a plain run's (it was written empty before).
    Compared as loaded: transformers 5 writes a BERT LayerNorm loaded under ZeRO-3 by its legacy names
    (gamma/beta), which it reads back as weight/bias."""
    from sentence_transformers import SentenceTransformer

    train_file = subsample(DEMO_DATA / "retail_search_train.jsonl", tmp_path / "train.jsonl", 64)
    recipe = write_recipe(tmp_path / "r.toml", retrieval_recipe_text(tmp_path, minilm, train_file, train_file, None))
    saved = {}
    for profile in ("plain", "zero3"):
        out = tmp_path / profile
        train([sys.executable, "-m", "crb.run", str(recipe), "--set", "train.max_steps=2", "--set",
               f"hardware.profile='{profile}'", "--set", f"output.dir='{out}'", "--set", "data.eval=[]"])
        saved[profile] = SentenceTransformer(str(out / "final_model"), device="cpu").state_dict()
    base = SentenceTransformer(minilm, device="cpu").state_dict()
    assert saved["zero3"].keys() == saved["plain"].keys() == base.keys()
    for k, v in saved["plain"].items():
        torch.testing.assert_close(saved["zero3"][k], v, atol=1e-5, rtol=1e-4)
    moved = [k for k in base if not torch.equal(base[k], saved["zero3"][k])]
    assert len(moved) > len(base) // 2, "the saved weights are not the trained ones"
