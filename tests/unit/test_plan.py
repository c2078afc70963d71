"""`crb plan`: per-component arithmetic against hand-computed values on the real shapes (configs only,
built on the meta device), the profile chosen for simulated cards, and the JSON the CLI prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig, M2M100Config, MistralConfig, Starcoder2Config, T5Config

from crb.cli import main
from crb.engine import plan as plans
from crb.engine.hardware import Gpu, Hardware
from crb.recipe import schema as recipes

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30

SHAPES = {
    "mistral-7b": MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                sliding_window=None),  # v0.3: no sliding window
    "starcoder2-3b": Starcoder2Config(vocab_size=49152, hidden_size=3072, intermediate_size=12288,
                                      num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
                                      sliding_window=4096),
    "nllb-600m": M2M100Config(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
                              encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                              decoder_ffn_dim=4096, scale_embedding=True),
    "instructor-xl": T5Config(vocab_size=32128, d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64,
                              feed_forward_proj="gated-gelu"),
}
RECIPES = {"language": "mistral-7b", "code": "starcoder2-3b", "translation": "nllb-600m",
           "retrieval": "instructor-xl", "clara": "mistral-7b"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, config in SHAPES.items():
        path = tmp_path_factory.mktemp(name)
        config.save_pretrained(path)  # config.json only: the planner reads no weights
        out[name] = path
    return out


def load(name: str, shapes: dict[str, Path], *overrides: str) -> recipes.Recipe:
    """A bundled recipe on a config-only model dir; train.kernels "none" and train.compile false unless set (their
    "auto" depends on whether liger-kernel is installed and on the card)."""
    pinned = [o for key, o in (("train.kernels", 'train.kernels="none"'), ("train.compile", "train.compile=false"))
              if not any(x.startswith(key) for x in overrides)]
    return recipes.load(ROOT / "recipes" / f"{name}.toml", [f"model.name={shapes[RECIPES[name]]}", *pinned,
                                                             *overrides])


def guide(name: str, shapes: dict[str, Path], *overrides: str) -> recipes.Recipe:
    """The recipe at the guide's settings: every layer checkpointed."""
    return load(name, shapes, "train.gradient_checkpointing=true", *overrides)


def card(gib: float | None, gpus: int = 1) -> Hardware:
    return Hardware(gpus=[Gpu("test", gib, gib, (9, 0))] * gpus if gib else [], bf16=True, ram_gib=64,
                    processes=gpus)


def test_lora_parameters_of_mistral_7b_r64_on_all_seven_projections(shapes):
    r = load("language", shapes)
    s = plans.shape_of(r, plans.meta_model(r), 4)
    assert s.trainable == 167_772_160
    assert s.linear == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856


def test_language_components_by_hand(shapes):
    c = plans.plan(guide("language", shapes), card(80)).components
    assert c["weights (nf4, incl. quant constants)"] == 3_600_416_768  # 6,979,321,856 x (0.5 + 1/64 + 4/16384)
    # embeddings + lm_head 2 x 32768 x 4096, norms 65 x 4096: bf16 (crb's k-bit prep upcasts only on fp16)
    assert c["weights (not quantized, bf16)"] == (2 * 32768 * 4096 + 65 * 4096) * 2
    assert c["trainable parameters (LoRA, fp32)"] == 167_772_160 * 4
    assert c[plans.PAGED] == 167_772_160 * 2  # paged 8-bit AdamW: two 1-byte states, outside torch's allocator
    micro = plans.plan(guide("language", shapes), card(80)).notes["micro_batch"]
    assert c["logits + loss (vocab x tokens)"] == micro * 8192 * 32768 * 14  # bf16 + fp32 + log-softmax + grad
    assert c["activation checkpoints (32 layer inputs)"] == micro * 8192 * 4096 * 2 * 32
    # q, k, v and gate, up keep one dropped input each (method.lora.shared_dropout): 3 hidden-wide copies fewer
    assert c["activations (one layer recomputed)"] == micro * 8192 * 2 * ((14 - 3 * plans.DROPPED_COPY) * 4096
                                                                          + 5 * 14336)


def test_code_counts_its_tied_embedding_once_and_a_plain_mlp(shapes):
    r = load("code", shapes, "train.micro_batch=1")
    s = plans.shape_of(r, plans.meta_model(r), 1)
    assert not s.gated  # c_fc, c_proj: no gate
    c = plans.plan(guide("code", shapes, "train.micro_batch=1"), card(80)).components
    # StarCoder2 ties lm_head to the embedding: 49152 x 3072 once, plus 30 layers' biases and norms
    assert (s.params - s.linear) < 49152 * 3072 * 1.01
    assert c["weights (not quantized, bf16)"] == (s.params - s.linear) * 2
    # LayerNorm on a bf16 stream: 0.7 units more; a plain MLP: 2 fewer (no gate, no product)
    assert c["activations (one layer recomputed)"] == pytest.approx(  # q, k, v share one dropped input
        8192 * 2 * ((14.7 - 2 * plans.DROPPED_COPY) * 3072 + 3 * 12288))
    assert c["backward temporaries (plain MLP, fp32)"] == 8192 * 12288 * plans.PLAIN_MLP_BACKWARD


def test_allocated_leaves_out_the_cuda_context_and_paged_states(shapes):
    p = plans.plan(load("language", shapes), card(80))
    assert p.total - p.allocated == pytest.approx(p.components[plans.CONTEXT] + p.components[plans.PAGED])


def test_checkpointing_keeps_one_layer_instead_of_all(shapes):
    on = plans.plan(guide("code", shapes, "train.micro_batch=1"), card(80)).components
    off = plans.plan(load("code", shapes, "train.micro_batch=1", "train.gradient_checkpointing=false"),
                     card(80)).components
    assert off["activations (30 layers kept whole)"] == 30 * on["activations (one layer recomputed)"]
    assert not any(k.startswith("activation checkpoints") for k in off)


def test_checkpointing_some_layers_keeps_the_rest_whole(shapes):
    """N of L layers checkpointed: N layer inputs plus L - N whole layers; the recomputed layer runs after
    the whole ones are freed, so it adds nothing while any layer is kept whole."""
    r = load("language", shapes, "train.micro_batch=1")
    s = plans.shape_of(r, plans.meta_model(r), 1)
    c = plans.plan(load("language", shapes, "train.micro_batch=1", "train.gradient_checkpointing=12"),
                   card(139)).components
    assert c["activation checkpoints (12 layer inputs)"] == 12 * 8192 * 4096 * 2
    assert c["activations (20 layers kept whole)"] == pytest.approx(20 * 8192 * plans.layer_bytes(r, s))
    assert "activations (one layer recomputed)" not in c


def test_eager_attention_adds_the_scores(shapes):
    sdpa = plans.plan(load("translation", shapes, "train.gradient_checkpointing=false"),
                      card(80)).components["activations (24 layers kept whole)"]
    eager = plans.plan(load("translation", shapes, 'model.attn_implementation="eager"',
                            "train.gradient_checkpointing=false"),
                       card(80)).components["activations (24 layers kept whole)"]
    # 16 batch x 2 x 512 tokens through 12 layers of each stack, 16 heads x 512 keys x (2 + 4 + 1) bytes
    assert eager - sdpa == 12 * 16 * 2 * 512 * 16 * 512 * 7


def test_clara_counts_both_passes_and_two_adapters(shapes):
    r = load("clara", shapes)
    s = plans.shape_of(r, plans.meta_model(r), 2)
    assert s.trainable == 2 * 16 * 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 2 + 14336 + 4096)
    assert s.tokens == 2 * (256 + 3 + 8) + 2 * 2048  # the encoder over one document, then the decoder


def test_retrieval_plans_the_encoder_only_and_the_cached_mini_batch(shapes):
    r = load("retrieval", shapes)
    s = plans.shape_of(r, plans.meta_model(r), 64)
    assert 1.2e9 < s.params < 1.3e9  # T5-XL's encoder, not the encoder-decoder
    assert s.tokens == 16 * 512 and s.logit_tokens == 0  # cached_mnrl: 16 rows of one column at a time
    plain = load("retrieval", shapes, 'losses=[{name="mnrl"}]')
    assert plans.shape_of(plain, plans.meta_model(plain), 64).tokens == 64 * 3 * 512  # query, positive, negative


def test_t5_blocks_keep_their_traced_activations(shapes):
    """Instructor-XL's T5 block: 26 hidden + 8 intermediate bf16 units per token, and 12 bytes per
    attention score (the position bias sends SDPA to the math path): 274 kB/token measured at 256 tokens."""
    r = load("retrieval", shapes, "data.max_length=256")
    s = plans.shape_of(r, plans.meta_model(r), 64)
    assert plans.layer_bytes(r, s) == 2 * (26 * 2048 + 8 * 5120) + 32 * 256 * 12


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_guide_recipe_runs_plainly_on_80_gb(shapes, name):
    p = plans.plan(load(name, shapes), card(80))
    assert p.profile == "plain" and p.fits, p.table()


@pytest.mark.parametrize("name", ["language", "code"])
def test_auto_checks_fewer_layers_on_larger_cards_and_every_choice_fits(shapes, name):
    """gradient_checkpointing and micro_batch "auto": the plan of the chosen setting fits every card, a larger
    card's choice is no slower by the speed model, and no other setting that fits without offloading is faster
    (the optimizer in CPU memory is tried only when nothing fits plainly)."""
    r = load(name, shapes, "train.batch_size=8")
    assert r.train.gradient_checkpointing == "auto" and r.train.micro_batch == "auto"
    chosen = {}
    for gib in (16, 24, 48, 80, 139):
        resolved, why = plans.auto_config(r, card(gib))
        t = resolved.train
        p = plans.plan(resolved, card(gib))
        assert p.fits and p.profile == "plain", (gib, p.table())
        blocks = p.notes["layers"]
        cost = (1 + plans.RECOMPUTE * t.gradient_checkpointing / blocks) * (1 + plans.SATURATE / (t.micro_batch * 8192))
        chosen[gib] = (t.micro_batch, t.gradient_checkpointing, cost)
        for m in (1, 2, 4, 8) if gib == 24 else ():  # no faster setting fits (checked on one card: it is slow)
            for k in range(blocks + 1):
                other = load(name, shapes, "train.batch_size=8", f"train.micro_batch={m}",
                             f"train.gradient_checkpointing={k}", "train.offload_activations=false")
                if (o := plans.plan(other, card(gib))).fits and o.profile == "plain":
                    assert (1 + plans.RECOMPUTE * k / blocks) * (1 + plans.SATURATE / (m * 8192)) >= cost - 1e-9
                    break
        assert f"checkpointing {t.gradient_checkpointing} of {blocks} layers (auto)" in why[-1]
    costs = [chosen[g][2] for g in (16, 24, 48, 80, 139)]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    assert chosen[16][1] > 0 and chosen[80][1] == 0


def test_explicit_checkpointing_keeps_its_meaning(shapes):
    r = load("language", shapes, "train.gradient_checkpointing=true")
    resolved, _ = plans.auto_config(r, card(139))
    assert resolved.train.gradient_checkpointing is True and resolved.train.micro_batch == 16  # largest that fits
    assert plans.plan(r, card(139)).notes["checkpointed_layers"] == 32
    r = load("language", shapes, "train.gradient_checkpointing=false", "train.micro_batch=1")
    assert plans.plan(r, card(139)).notes["checkpointed_layers"] == 0


def test_no_gpu_resolves_auto_to_the_plain_path(shapes):
    resolved, why = plans.auto_config(recipes.load(ROOT / "recipes" / "language.toml",
                                                   [f"model.name={shapes['mistral-7b']}"]), card(None))
    t = resolved.train
    assert (t.kernels, t.gradient_checkpointing, t.micro_batch, t.offload_activations) == ("none", False, 1, False)
    assert why[:2] == ["attention auto -> sdpa (rows of one document each)", "kernels auto -> none (no CUDA GPU)"]
    assert resolved.model.attn_implementation == "sdpa"


@pytest.mark.parametrize("packing, gpu, expected", [(True, 139, "flex_attention"), (True, None, "sdpa"),
                                                     (False, 139, "sdpa")])
def test_attention_auto_takes_flex_attention_for_packed_rows_on_cuda(shapes, packing, gpu, expected):
    r = load("language", shapes, f"data.packing={str(packing).lower()}", 'model.attn_implementation="auto"')
    resolved, why = plans.auto_config(r, card(gpu))
    assert resolved.model.attn_implementation == expected
    assert why[0].startswith(f"attention auto -> {expected}")
    assert r.model.attn_implementation == "auto"  # the recipe itself is left as it was


def test_8_gb_language_with_adamw_offloads_the_optimizer(shapes):
    """At 8 GB the 7B QLoRA recipe with plain AdamW (fp32 states on the GPU) at ctx 2304 fits only with ZeRO-2
    offload (no optimizer on the GPU). The paged 8-bit optimizer keeps too little on the GPU for offload to pay."""
    p = plans.plan(guide("language", shapes, "data.max_length=2304", 'train.optimizer="adamw"'), card(8), 1)
    assert p.profiles["plain"] > 8 * GIB * plans.HEADROOM
    assert p.profile == "zero2-offload" and p.fits, p.table()


def test_8_gb_language_at_8192_does_not_fit_and_says_what_would(shapes):
    p = plans.plan(load("language", shapes), card(8), 1)
    assert p.fits is False
    lengths = [int(m[1]) for a in p.advice if (m := re.match(r"data.max_length = (\d+) fits", a))]
    assert lengths and lengths[0] < 8192, p.advice
    assert plans.plan(load("language", shapes, f"data.max_length={lengths[0]}"), card(8), 1).fits


def test_qlora_never_gets_zero3(shapes):
    for gib in (8, 12, 24, 80):
        for gpus in (1, 2):
            p = plans.plan(load("language", shapes, "data.max_length=1024"), card(gib, gpus), 1)
            assert plans.PROFILES[p.profile].zero_stage < 3


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("gib", [8, 12, 24, 80])
@pytest.mark.parametrize("name", list(RECIPES))
def test_choice_is_the_first_profile_that_fits(shapes, name, gib, gpus):
    """Every recipe on every simulated card: the chosen profile fits, and no profile before it in
    PROFILES' order (plain, zero2, zero2-offload, zero3, zero3-offload) that it may use does."""
    r = load(name, shapes, "train.micro_batch=1" if name != "retrieval" else "train.batch_size=64")
    p = plans.plan(r, card(gib, gpus), 1)
    usable = gib * GIB * plans.HEADROOM
    order = list(plans.PROFILES)
    allowed = [n for n in order[:order.index(p.profile)]
               if (gpus > 1 or plans.PROFILES[n].offload_optimizer or n == "plain")
               and (r.method.name != "qlora" or plans.PROFILES[n].zero_stage < 3)]
    if p.fits:
        assert all(p.profiles[n] > usable for n in allowed), (p.profile, p.profiles)
    else:
        assert p.profiles[p.profile] == min(p.profiles[n] for n in [*allowed, p.profile]) and p.advice
    if gib == 80:
        assert p.profile == "plain" and p.fits


def test_full_fine_tune_that_does_not_fit_8_gb_offloads(shapes):
    r = load("translation", shapes, "train.micro_batch=2")
    p = plans.plan(r, card(8))
    assert p.profiles["plain"] > 8 * GIB * 0.95  # fp32 weights, gradients and AdamW: 16 bytes x 615M
    assert p.profile in ("zero2-offload", "zero3-offload") and p.fits, p.table()
    assert p.components["optimizer states"] == 0


def test_two_gpus_shard_optimizer_states_with_zero2(shapes):
    r = load("translation", shapes)
    one = plans.estimate(r, plans.shape_of(r, plans.meta_model(r), 16), plans.PROFILES["zero2"], 1)
    two = plans.estimate(r, plans.shape_of(r, plans.meta_model(r), 16), plans.PROFILES["zero2"], 2)
    assert two["optimizer states"] == pytest.approx(one["optimizer states"] / 2)
    buckets = 2 * 2e8 * plans.HALF  # launch/deepspeed/zero2.json: reduce_bucket_size 2e8, overlap_comm (two buffers)
    assert two["gradients"] - buckets == pytest.approx((one["gradients"] - buckets) / 2)


def test_forced_profile_is_kept(shapes):
    p = plans.plan(load("translation", shapes, 'hardware.profile="zero3-offload"'), card(80))
    assert p.profile == "zero3-offload"


def test_auto_micro_batch_takes_the_largest_that_fits(shapes):
    r = load("translation", shapes, 'train.micro_batch="auto"', "train.gradient_checkpointing=true")
    m80 = plans.auto_config(r, card(80))[0].train.micro_batch
    m24 = plans.auto_config(r, card(24))[0].train.micro_batch
    assert r.train.batch_size % m80 == 0 and r.train.batch_size % m24 == 0
    assert m80 > m24 >= 1
    assert plans.plan(r, card(80), m80).fits
    bigger = [d for d in range(m80 + 1, r.train.batch_size + 1) if r.train.batch_size % d == 0]
    assert not bigger or not plans.plan(r, card(80), bigger[0]).fits


def test_plan_for_n_gpus_shards_under_zero_and_picks_the_profile(shapes, capsys):
    """`crb plan --gpus N`: per-GPU memory. A full fine-tune of the 7B shape (fp32 weights, AdamW) on 80 GiB cards:
    one GPU needs the optimizer in CPU memory; two fit under ZeRO-3 (ZeRO-2 keeps every bf16 weight, and its step
    an fp32 copy of the gradients: 81 GiB; an optimizer on the CPU comes last, as the slowest); ZeRO-3's per-GPU
    weights, gradients and states are half of one GPU's, and ZeRO-2 shards the gradients and states, not the
    weights."""
    def planned(gpus: int) -> dict:
        main(["plan", str(ROOT / "recipes" / "language.toml"), "--set", f"model.name={shapes['mistral-7b']}",
              "--set", 'method.name="full"', "--set", 'train.optimizer="adamw"', "--set", "data.max_length=4096",
              "--set", "train.micro_batch=1", "--set", "train.gradient_checkpointing=true",
              "--gpu-memory", "80", "--gpus", str(gpus), "--json"])
        return json.loads(capsys.readouterr().out)

    one, two = planned(1), planned(2)
    assert one["notes"]["gpus"] == 1 and two["notes"]["gpus"] == 2
    assert one["profile"].endswith("offload") and two["profile"] == "zero3" and two["fits"]
    assert two["profiles_gib"]["plain"] == pytest.approx(one["profiles_gib"]["plain"])  # plain DDP: nothing shared
    states = 7.25e9 * (2 + 2 + 12) / 2**30  # DeepSpeed: bf16 weights and gradients, fp32 master + two moments
    assert one["profiles_gib"]["zero3"] - two["profiles_gib"]["zero3"] == pytest.approx(states / 2, rel=0.1)
    assert two["profiles_gib"]["zero2"] > two["profiles_gib"]["zero3"]


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_full_fine_tune_peaks_at_its_optimizer_step(shapes, gpus):
    """A full fine-tune's peak is the optimizer step, once activations are freed. Under ZeRO it flattens the bf16
    gradient partition and copies it to fp32, ZeRO-2 whole (every weight in bf16 + 20 bytes per parameter over the
    GPUs: 22 per parameter on one, as measured at StarCoder2-3B's later steps), ZeRO-3 one sub-group of 1e9 at a
    time (16 bytes per parameter over the GPUs + 6 per element of the sub-group + the gathered layer)."""
    sets = ['method.name="full"', 'train.optimizer="adamw"', "data.max_length=4096", "train.micro_batch=1",
            'train.kernels="liger"']  # the measured rows' fused loss: no logits held
    r = guide("language", shapes, *sets)
    n = plans.shape_of(r, plans.meta_model(r), 1).params
    zero2 = plans.plan(guide("language", shapes, *sets, 'hardware.profile="zero2"'), card(140, gpus)).components
    assert set(zero2) == {"weights", "optimizer states", "gradients", plans.STEP, plans.CONTEXT}
    assert zero2["weights"] + zero2["optimizer states"] + zero2["gradients"] + zero2[plans.STEP] == \
        pytest.approx(n * (2 + 20 / gpus))
    p = plans.plan(guide("language", shapes, *sets, 'hardware.profile="zero3"'), card(140, gpus))
    assert p.components[plans.STEP] == 6 * 1e9 and p.components["gradients"] == pytest.approx(2 * n / gpus)
    assert p.allocated == pytest.approx(16 * n / gpus + 6e9 + 2 * n / 32, rel=1e-3)  # + one of 32 layers gathered
    # plain data parallel peaks at its step too, with no copies (fused AdamW): fp32 weights, gradients and two
    # moments, 16 B per parameter (H200: 108.2 GiB measured)
    plain = plans.plan(guide("language", shapes, *sets, 'hardware.profile="plain"'), card(140, gpus))
    assert plans.STEP not in plain.components and plain.allocated == pytest.approx(16 * n)


def test_offload_plans_the_cpu_memory_of_the_machine_and_says_when_it_does_not_fit(shapes):
    """An offloaded full fine-tune of the 7B shape: 16 B per parameter of optimizer (fp32 master, two moments, fp32
    gradients) and 2 B of bf16 weights in CPU memory, each process's runtime and the main process's final save
    (9.8 B per parameter): 190 GiB on one machine, so a 126 GiB machine does not fit and is told why, a 256 GiB
    one does. With 1 of 2 processes on this machine (two nodes) it holds half the states. Nothing offloaded:
    nothing planned."""
    sets = ['method.name="full"', 'train.optimizer="adamw"', "data.max_length=4096", "train.micro_batch=1"]
    r = guide("language", shapes, *sets, 'hardware.profile="zero3-offload"')
    n = plans.shape_of(r, plans.meta_model(r), 1).params

    def on(ram: float, gpus: int = 1, local: int = 0) -> plans.Plan:
        return plans.plan(r, Hardware(gpus=[Gpu("test", 140, 140, (9, 0))] * gpus, bf16=True, ram_gib=ram,
                                      processes=gpus, local_processes=local))

    small = on(126)
    assert sum(small.host.values()) == pytest.approx(n * (16 + 2 + plans.SAVE_HOST_BYTES) + plans.RUNTIME_HOST)
    assert small.fits is False and small.advice[0].startswith("zero3-offload needs 190 GiB of CPU memory")
    assert on(256).fits is True and "CPU memory of this machine: 190." in on(256).table()
    node = on(256, gpus=2, local=1).host
    assert node["optimizer (fp32 master weights, AdamW states, fp32 gradients)"] == pytest.approx(8 * n)
    assert plans.plan(guide("language", shapes, *sets, 'hardware.profile="zero3"'), card(140, 2)).host == {}


def test_plan_json_schema(shapes, capsys):
    rc = main(["plan", str(ROOT / "recipes" / "language.toml"), "--set", f"model.name={shapes['mistral-7b']}",
               "--set", "train.gradient_checkpointing=true", "--set", 'train.kernels="none"', "--gpu-memory", "24",
               "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) >= {"components_gib", "total_gib", "capacity_gib", "profile", "reason", "fits", "profiles_gib",
                      "advice", "notes"}
    assert set(d) >= {"allocated_gib", "host_gib", "ram_gib"} and d["host_gib"] == {}  # nothing offloaded
    assert d["capacity_gib"] == 24 and d["profile"] == "plain" and d["fits"] is True
    assert d["notes"]["micro_batch"] == 2  # "auto": the largest that fits 24 GB
    assert d["total_gib"] == pytest.approx(sum(d["components_gib"].values()), abs=0.01)


def test_full_fine_tune_checkpoints_are_fp32_and_one_column_is_recomputed(shapes):
    """fp32 weights under autocast keep an fp32 residual stream; sentence-transformers encodes query,
    positive and negative in separate passes, so backward recomputes one column's layer at a time."""
    r = load("retrieval", shapes, 'losses=[{name="mnrl"}]', "train.gradient_checkpointing=true")
    s = plans.shape_of(r, plans.meta_model(r), 64)
    c = plans.plan(r, card(80)).components
    assert c["activation checkpoints (24 layer inputs)"] == 64 * 3 * 512 * 2048 * 4 * 24
    assert c["activations (one layer recomputed)"] == 64 * 512 * plans.layer_bytes(r, s)


def test_8_gb_language_at_8192_fits_with_the_fused_loss_and_offloaded_checkpoints(shapes):
    """"auto" offload turns on only where the plan needs it; with liger's fused loss the guide's ctx 8192 fits 8 GB."""
    r = guide("language", shapes, 'train.offload_activations="auto"')
    assert plans.auto_config(r, card(80))[0].train.offload_activations is False
    assert plans.auto_config(r, card(8))[0].train.offload_activations is True
    p = plans.plan(r, card(8))
    assert p.components["activation checkpoints (offloaded to pinned CPU memory)"] == 0
    assert not p.fits and any('train.kernels = "liger"' in a for a in p.advice)
    fused = plans.plan(guide("language", shapes, 'train.offload_activations="auto"', 'train.kernels="liger"'),
                       card(8))
    assert fused.fits and fused.profile == "zero2-offload"
    assert "logits + loss (vocab x tokens)" not in fused.components
    assert fused.components[plans.FUSED] == 8192 * 4096 * plans.FUSED_BYTES
    code = plans.plan(load("code", shapes, 'train.kernels="liger"'), card(80)).components  # liger's loss alone
    assert "logits + loss (vocab x tokens)" not in code and plans.FUSED in code


def test_offload_without_checkpointing_is_an_error_naming_the_key(shapes):
    with pytest.raises(recipes.RecipeError, match=r"train\.offload_activations"):
        load("language", shapes, "train.gradient_checkpointing=false", "train.offload_activations=true")


def test_data_facts_read_the_longest_row_and_whether_rows_pack_documents():
    import numpy as np

    packed = {"input_ids": np.arange(5), "position_ids": np.array([0, 1, 2, 0, 1])}
    single = {"input_ids": np.arange(3), "position_ids": np.arange(3)}
    assert plans.data_facts([packed, single], "text") == plans.DataFacts(5, True)
    assert plans.data_facts([single], "chatml") == plans.DataFacts(3, False)
    assert plans.data_facts([{"dec_ids": np.arange(120), "doc_ids": np.arange(256)}], "clara").longest == 120
    assert plans.data_facts([{"input_ids": np.arange(7), "labels": np.arange(9)}], "translation").longest == 9
    assert plans.data_facts([], "text") is None
    assert plans.data_facts([{"texts": ["a", "b"]}], "retrieval") is None


def test_clara_micro_batch_comes_from_its_decoder_prompts(shapes):
    """Without rows the plan takes data.max_length (2048) for CLaRa's decoder prompt; with the prepared rows'
    longest prompt (~120 tokens) the micro-batch is several times larger, and its plan still fits."""
    r = load("clara", shapes, 'train.micro_batch="auto"')
    facts = plans.DataFacts(120, False)
    bound, _ = plans.auto_config(r, card(139))
    real, why = plans.auto_config(r, card(139), facts)
    assert real.train.micro_batch >= 4 * bound.train.micro_batch
    assert plans.plan(real, card(139), data=facts).fits
    assert f"micro-batch {real.train.micro_batch} (auto)" in why[-1]


def test_attention_auto_follows_the_rows_not_the_packing_switch(shapes):
    r = load("language", shapes, "data.packing=true")
    one_doc, why = plans.auto_config(r, card(139), plans.DataFacts(8192, False))
    assert one_doc.model.attn_implementation == "sdpa" and why[0].startswith("attention auto -> sdpa")
    packed, _ = plans.auto_config(r, card(139), plans.DataFacts(8192, True))
    assert packed.model.attn_implementation == "flex_attention"


BOTH = {"liger_kernel", "cut_cross_entropy"}


@pytest.mark.parametrize("fmt, gpu, installed, expected", [
    ("chatml", True, {"liger_kernel"}, "liger"), ("text", True, set(), "none"), ("text", False, BOTH, "none"),
    ("translation", True, BOTH, "cce"), ("translation", True, {"liger_kernel"}, "none"),
    ("retrieval", True, BOTH, "none"), ("clara", True, BOTH, "none")])
def test_kernels_auto_per_format(monkeypatch, fmt, gpu, installed, expected):
    """liger for chat and text; cut-cross-entropy for translation (liger's chunks are slow at 256k / 1024);
    nothing without CUDA or the package, and nothing yet for retrieval and CLaRa."""
    import importlib.util

    from crb.engine.kernels import resolve_kernels

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in installed else
                        None if name in ("liger_kernel", "cut_cross_entropy") else real(name, *a))
    kernels, reason = resolve_kernels(fmt, gpu)
    assert kernels == expected and reason


@pytest.mark.parametrize("fmt, gpu, expected", [
    ("text", True, True), ("retrieval", True, True), ("text", False, False), ("chatml", True, False),
    ("translation", True, "graphs"), ("translation", False, False), ("clara", True, False)])
def test_compile_auto_where_it_was_measured_faster(shapes, fmt, gpu, expected):
    """On CUDA: compiled layers for text (StarCoder2) and retrieval models, CUDA graphs for translation (its step
    is bound by kernel launches); never without a GPU; chat and CLaRa stay eager (not measured faster)."""
    from crb.engine.kernels import resolve_compile

    on, reason = resolve_compile(fmt, gpu)
    assert on == expected and reason
    r, why = plans.auto_config(load("code", shapes, 'train.compile="auto"'), card(139) if gpu else card(0))
    if fmt == "text":
        assert r.train.compile is expected and f"compile auto -> {'on' if expected else 'off'}" in " ".join(why)


def test_compile_auto_stays_off_where_liger_patches_the_model(shapes):
    """A text recipe on Mistral with liger's kernels: liger already fuses the elementwise work (and dynamo cannot
    trace its Triton kernels), so compile "auto" stays off; StarCoder2 (liger's loss only) compiles."""
    for name, expected in (("language", False), ("code", True)):
        r, why = plans.auto_config(load(name, shapes, 'data.format="text"', 'train.kernels="liger"',
                                        'train.compile="auto"'), card(139))
        assert r.train.compile is expected, (name, why)


# ---------------------------------------------------------------- against measured peaks

ACCURACY = json.loads((ROOT / "benchmarks" / "results" / "plan_accuracy.json").read_text())
TOLERANCE = 0.05  # docs/plan.md: every measured row within 5 %, but those in OFF
# Rows the plan misses for a known reason (strict: a corrected plan makes the mark fail and go).
OFF: dict = {  # (recipe, setting) -> why the plan misses a measured row, for a strict xfail
}


def _accuracy_rows() -> list:
    out = []
    for r in ACCURACY["rows"]:
        key = (r["recipe"], r["setting"])
        off = [pytest.mark.xfail(raises=AssertionError, strict=True, reason=OFF[key])] if key in OFF else []
        out.append(pytest.param(r, id=f"{r['recipe']} / {r['setting']}", marks=off))
    return out


def replayed_config(row: dict) -> list[str]:
    """A re-measured row's own overrides (benchmarks/plan_accuracy.py records them, paths left out) and every
    "auto" as that run resolved it: kernels, compile, attention, micro-batch, checkpointed layers, offload."""
    c = row["chosen"]
    lora = row.get("recipe") not in ("translation", "retrieval")  # frontier rows: language and code
    layers = {0: "false", c["layers"]: "true"}.get(c["checkpointed_layers"], c["checkpointed_layers"])
    out = [*row["sets"], f'hardware.profile="{c["profile"]}"', f'train.kernels="{c["kernels"]}"',
           f"train.compile={str(bool(c.get('compile'))).lower()}",
           f"train.offload_activations={str(c['offload_activations']).lower()}",
           f"train.micro_batch={c['micro_batch']}", f"train.gradient_checkpointing={layers}",
           *[f"method.lora.shared_dropout={str(c.get('shared_dropout', False)).lower()}"] * lora]  # older: per adapter
    return out + ([f'model.attn_implementation="{c["attention"]}"'] if c["attention"] else [])


@pytest.mark.parametrize("row", _accuracy_rows())
def test_plan_meets_the_measured_peak(shapes, row, tmp_path):
    """Each run of benchmarks/results/plan_accuracy.json (H200, 3 optimizer steps, rows of max_length tokens)
    planned again by today's code with that run's configuration: the plan's allocator part is within 5 % of the
    measured torch.cuda.max_memory_allocated; a run that ran out of memory is one the plan says does not fit.
    The prediction is recomputed, never read from the file."""
    gib, n = float(row["env"].get("CRB_GPU_MEMORY_GB", ACCURACY["device_gib"])), row.get("gpus", 1)
    hw = Hardware(gpus=[Gpu(ACCURACY["device"], gib, gib, (9, 0))] * n, bf16=True, ram_gib=1000, processes=n)
    model = shapes[RECIPES[row["recipe"]]]
    if row.get("model_layers"):  # the shape with fewer decoder layers (the offload rows on one GPU)
        config = AutoConfig.from_pretrained(model)
        config.num_hidden_layers = row["model_layers"]
        model = tmp_path / "model"
        config.save_pretrained(model)
    r = recipes.load(ROOT / "recipes" / f"{row['recipe']}.toml", [f"model.name={model}", *replayed_config(row)],
                     stage=row.get("stage") or ("compression" if row["recipe"] == "clara" else None))
    p = plans.plan(r, hw, advise=False)
    assert p.profile == row["run_profile"]
    if row["status"] != "ok":  # it ran out of memory
        assert "out of memory" in " ".join(row["note"]) and p.fits is False
        return
    predicted, measured = p.allocated / GIB, row["measured_gib"]
    assert abs(predicted - measured) <= TOLERANCE * measured, \
        f"plan {predicted:.3f} GiB, measured {measured:.3f} GiB ({100 * (predicted - measured) / measured:+.1f} %)"


FRONTIER = json.loads((ROOT / "benchmarks" / "results" / "frontier.json").read_text())["metrics"]
FRONTIER_OFF: dict = {}  # (recipe, cap) -> why a frontier row misses, for a strict xfail


def _frontier_rows() -> list:
    out = []
    for name in ("language", "code"):
        for cap, row in [("whole", FRONTIER[name]["whole_card"])] + [(str(c["cap_gib"]), c) for c in
                                                                     FRONTIER[name]["caps"]]:
            off = [pytest.mark.xfail(raises=AssertionError, strict=True, reason=FRONTIER_OFF[name, cap])] \
                if (name, cap) in FRONTIER_OFF else []
            out.append(pytest.param(name, cap, row, id=f"{name} / {cap}", marks=off))
    return out


@pytest.mark.parametrize("name, cap, row", _frontier_rows())
def test_plan_meets_the_frontier_peaks(shapes, name, cap, row):
    """The frontier benchmark's crb runs (benchmarks/results/frontier.json: ctx 8192, 8 rows per step, each cap's
    automatic configuration: checkpointed layers, micro-batch, offload, compile) replanned with the configuration
    each run chose: within 5 % of the measured peak."""
    c = row["crb_config"]
    sets = ['data.format="text"', "data.packing=true", "data.max_length=8192", "data.eval_split=0",
            f"train.batch_size={FRONTIER_ROWS_PER_STEP}"]
    replay = replayed_config({"sets": sets, "chosen": c})
    gib = ACCURACY["device_gib"] if cap == "whole" else float(cap)
    hw = Hardware(gpus=[Gpu("H200", gib, gib, (9, 0))], bf16=True, ram_gib=1000, processes=1)
    r = recipes.load(ROOT / "recipes" / f"{name}.toml", [f"model.name={shapes[RECIPES[name]]}", *replay])
    predicted, measured = plans.plan(r, hw, advise=False).allocated / GIB, row["crb_peak_gib"]
    assert abs(predicted - measured) <= TOLERANCE * measured, \
        f"plan {predicted:.3f} GiB, measured {measured:.3f} GiB ({100 * (predicted - measured) / measured:+.1f} %)"


FRONTIER_ROWS_PER_STEP = 8  # benchmarks/frontier.py ROWS_PER_STEP


def test_clara_checkpointing_counts_the_passes_that_keep_activations(shapes):
    """Checkpointed CLaRa layers keep their inputs for every pass with gradient (the encoder's documents, stage 3's
    question instead of its candidates, the decoder prompt); one layer of the longest pass is recomputed."""
    path = ROOT / "recipes" / "clara.toml"
    enc = 256 + 3 + 8
    for stage, docs, length in [("compression", 1, 2048), ("instruction", 5, 2048), ("end_to_end", 1, 1024)]:
        r = recipes.load(path, [f"model.name={shapes['mistral-7b']}", 'train.kernels="none"',
                                "train.gradient_checkpointing=true", "train.micro_batch=2"], stage=stage)
        s = plans.shape_of(r, plans.meta_model(r), 2)
        assert s.tokens == 2 * docs * enc + 2 * length and s.pass_tokens == max(2 * docs * enc, 2 * length), stage
        c = plans.plan(r, card(139)).components
        assert c["activation checkpoints (32 layer inputs)"] == s.tokens * 32 * 4096 * 2
        assert c["activations (one layer recomputed)"] == s.pass_tokens * plans.layer_bytes(r, s)


def test_clara_auto_config_checkpoints_layers_when_the_card_needs_it(shapes):
    r = load("clara", shapes, "train.micro_batch=1")
    roomy, _ = plans.auto_config(r, card(139))
    tight, why = plans.auto_config(r, card(24))
    assert roomy.train.gradient_checkpointing == 0
    assert 0 < tight.train.gradient_checkpointing <= 32 and plans.plan(tight, card(24)).fits
    assert f"checkpointing {tight.train.gradient_checkpointing} of 32 layers (auto)" in why[-1]


def test_compiled_layers_with_checkpointing_are_planned_with_a_dropout_per_adapter(shapes):
    """Compiled with checkpointing on, a run keeps peft's dropout per adapter (lora_dropout.shares): the plan
    counts each adapter's copy there, and the shared copy when the layers are eager or none is checkpointed."""
    def per_token(*sets: str) -> tuple[float, float]:
        shared, own = (load("code", shapes, "train.micro_batch=1", *sets, f"method.lora.shared_dropout={x}")
                       for x in ("true", "false"))
        s = plans.shape_of(shared, plans.meta_model(shared), 1)
        return plans.layer_bytes(shared, s), plans.layer_bytes(own, s)

    shared, own = per_token("train.compile=true", "train.gradient_checkpointing=29")
    assert shared == own
    for sets in (("train.compile=true", "train.gradient_checkpointing=false"),
                 ("train.compile=false", "train.gradient_checkpointing=29")):
        shared, own = per_token(*sets)
        assert own - shared > 2 * plans.DROPPED_COPY * plans.HALF * 3072 * 0.9, sets  # q, k, v: 2 copies fewer


def test_plan_of_a_staged_recipe_plans_each_stage(shapes, capsys):
    """`crb plan recipes/clara.toml`: one plan per stage, each with its own data shape (stage 2's encoder keeps
    top_k documents' activations, stage 3's only the question's, its N candidates compressed without grad);
    `--stage` plans one, the same as that stage's entry."""
    base = ["plan", str(ROOT / "recipes" / "clara.toml"), "--set", f"model.name={shapes['mistral-7b']}",
            "--set", "train.micro_batch=2", "--set", "train.gradient_checkpointing=false", "--gpu-memory", "139",
            "--json"]
    assert main(base) == 0
    stages = json.loads(capsys.readouterr().out)
    assert list(stages) == ["compression", "instruction", "end_to_end"]
    acts = {name: next(v for k, v in p["components_gib"].items() if k.startswith("activations"))
            for name, p in stages.items()}
    assert acts["instruction"] > acts["end_to_end"] and acts["instruction"] > acts["compression"]
    assert main([*base, "--stage", "end_to_end"]) == 0
    assert json.loads(capsys.readouterr().out) == stages["end_to_end"]
