"""scripts/estimate.py on the tiny workspace: the FLOPs it predicts follow what the step runs."""

from __future__ import annotations

import json

import estimate


def test_estimate_counts_the_suffix_backward_and_the_zero_stage(tiny_env, tmp_path, capsys):
    on, off, zero_0 = tmp_path / "on.json", tmp_path / "off.json", tmp_path / "zero0.json"
    ds = json.loads((estimate.REPO / "code" / "dsconfig" / "cpu.json").read_text())      # ZeRO-2
    zero_0.write_text(json.dumps({**ds, "zero_optimization": {"stage": 0}}))
    big = "train.micro_batch_size=64"          # compute-bound passes: the split pays (suffix.worth_splitting)
    assert estimate.main([*tiny_env.argv("stage_2", big), "--json", str(on), "--gpus", "8", "--mfu", "0.4",
                          "--ds_config", str(estimate.REPO / "code" / "dsconfig" / "cpu.json")]) == 0
    assert estimate.main([*tiny_env.argv("stage_2", big, "train.suffix_backward=false"), "--json", str(off),
                          "--gpus", "8", "--ds_config", str(zero_0)]) == 0
    fast, full = json.loads(on.read_text()), json.loads(off.read_text())
    assert fast["tokens_per_sample"] == full["tokens_per_sample"] > 10
    assert fast["grad_tokens_per_sample"] < fast["tokens_per_sample"] / 2       # only the signal block and after
    assert full["grad_tokens_per_sample"] == full["tokens_per_sample"]
    assert 0.5 < fast["full_backward_ratio"] < 0.8 < full["full_backward_ratio"]
    h100, a100 = fast["predictions"][:2]
    assert (h100["gpu"], a100["gpu"]) == ("H100", "A100-80GB")
    assert h100["samples_per_s_per_gpu"] > 3 * a100["samples_per_s_per_gpu"] > 0   # 989 vs 312 TFLOP/s
    assert fast["memory_gib"]["LLM weights"] > 12                                 # a bf16 7B on every GPU
    # ZeRO-2 partitions optimizer states over the 8 GPUs, ZeRO-0 keeps them whole
    assert (fast["memory_gib"]["zero"], full["memory_gib"]["zero"]) == (2, 0)
    assert abs(full["memory_gib"]["optimizer states"] - 8 * fast["memory_gib"]["optimizer states"]) < 1e-9
    assert "stage 2" in capsys.readouterr().out


def test_estimate_bad_mfu_is_one_line(tiny_env, capsys):
    assert estimate.main([*tiny_env.argv("stage_2"), "--mfu", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mfu") and err.count("\n") == 1


def test_estimate_micro_batch_1_is_weight_bound_and_does_not_split(tiny_env, tmp_path):
    out = tmp_path / "one.json"
    assert estimate.main([*tiny_env.argv("stage_2", "train.micro_batch_size=1"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suffix_backward_used"] is False and result["full_backward_ratio"] > 0.99
    assert all(p["bound"] == "weights" for p in result["predictions"])       # 13 GB read per pass, few rows


def test_estimate_adds_the_denoising_term_from_the_decoder(tiny_env, tmp_path):
    """gen_image on: the frozen tiny UNet's forward + backward and the VAE encoder per image block join the FLOPs,
    its weights and saved tensors the memory; off: none of it."""
    off, on = tmp_path / "off.json", tmp_path / "on.json"
    base = ["data.datasets=[cc3m_dec]", "train.micro_batch_size=4"]
    assert estimate.main([*tiny_env.argv("stage_2", *base), "--json", str(off)]) == 0
    assert estimate.main([*tiny_env.argv("stage_2", *base, "train.loss_weights={lm: 1.0, image: 1.0, gen_image: 1.0}"),
                          "--json", str(on)]) == 0
    without, with_ = json.loads(off.read_text()), json.loads(on.read_text())
    assert without["flops_per_sample"]["denoising"] == 0 and not without["denoising"]
    cost = with_["denoising"]["image"]
    cfg = tiny_env.config("stage_2")
    vae = json.loads((tiny_env.ckpt / "stable-diffusion" / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    assert cost["latent"] == [vae["latent_channels"], cfg.inference.image.height // scale,
                              cfg.inference.image.width // scale]
    assert cost["source"].endswith("stable-diffusion")                          # the tiny folder's UNet
    assert cost["unet_forward"] > 0 and cost["unet_backward"] > 0 and cost["vae_encode"] > 0
    per_block = cost["unet_forward"] + cost["unet_backward"] + cost["vae_encode"]
    assert with_["flops_per_sample"]["denoising"] == per_block                 # every cc3m_dec sample has one
    assert with_["flops_per_sample"]["total"] == without["flops_per_sample"]["total"] + per_block
    assert with_["memory_gib"]["decoder weights"] * 2**30 == 2 * cost["params"]
    assert with_["memory_gib"]["decoder activations"] * 2**30 == 4 * cost["saved_bytes"]
