"""The KL autoencoder against diffusers' AutoencoderKL on the same random weights, and its key conversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm, ldm_vae_to_diffusers, normalize_vae_state_dict
from sfumato.models.vae import SD_VAE, SDXL_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig

TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def reference(cfg: VAEConfig) -> RefAutoencoderKL:
    """diffusers' AutoencoderKL with the same shape as `cfg`, its norms and biases perturbed off their init."""
    levels = len(cfg.ch_mult)
    ref = RefAutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
    )
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


def ours_from(ref: RefAutoencoderKL, cfg: VAEConfig) -> AutoencoderKL:
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_vae_to_ldm(ref.state_dict()), strict=True)
    return ours


def check_parity(cfg: VAEConfig, image_size: int, latent_size: int) -> AutoencoderKL:
    ref = reference(cfg)
    ours = ours_from(ref, cfg)
    x = torch.rand(1, cfg.in_channels, image_size, image_size) * 2 - 1
    z = torch.randn(1, cfg.embed_dim, latent_size, latent_size)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        assert got.mean.shape == want.mean.shape
        assert rel_err(got.mean, want.mean) <= 1e-4
        assert rel_err(got.logvar, want.logvar) <= 1e-4
        out, want_out = ours.decode(z), ref.decode(z).sample
        assert out.shape == want_out.shape
        assert rel_err(out, want_out) <= 1e-4
    return ours


def test_tiny_matches_diffusers():
    torch.manual_seed(0)
    check_parity(TINY, image_size=32, latent_size=4)


def test_round_trip_and_unknown_keys():
    torch.manual_seed(0)
    sd = reference(TINY).state_dict()
    ldm = diffusers_vae_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # diffusers' up_blocks.0 (lowest resolution) is LDM's up.2, the last level.
    assert torch.equal(ldm["decoder.up.2.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ldm["decoder.up.0.block.0.nin_shortcut.bias"], sd["decoder.up_blocks.2.resnets.0.conv_shortcut.bias"])
    back = ldm_vae_to_diffusers(ldm)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    with pytest.raises(ValueError, match="encoder.mystery.weight"):
        diffusers_vae_to_ldm({**sd, "encoder.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="decoder.up.0.attn.0.q.weight"):
        ldm_vae_to_diffusers({**ldm, "decoder.up.0.attn.0.q.weight": torch.zeros(1)})


def test_legacy_diffusers_attention_names():
    torch.manual_seed(0)
    sd = reference(TINY).state_dict()
    legacy = {
        k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.").replace("to_out.0.", "proj_attn."): v
        for k, v in sd.items()
    }
    assert legacy.keys() != sd.keys()
    new, old = diffusers_vae_to_ldm(sd), diffusers_vae_to_ldm(legacy)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)
    with pytest.raises(ValueError, match="duplicates"):
        diffusers_vae_to_ldm({**sd, "encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)})


def test_normalize_reshapes_linear_attention():
    sd = AutoencoderKL(TINY).state_dict()
    flat = {k: v.reshape(v.shape[0], -1) if ".attn_1." in k and v.ndim == 4 else v for k, v in sd.items()}
    assert flat["decoder.mid.attn_1.proj_out.weight"].ndim == 2
    fixed = normalize_vae_state_dict({f"first_stage_model.{k}": v for k, v in flat.items()})
    assert {k: v.shape for k, v in fixed.items()} == {f"first_stage_model.{k}": v.shape for k, v in sd.items()}
    AutoencoderKL(TINY).load_state_dict(normalize_vae_state_dict(flat), strict=True)


def test_posterior_matches_diffusers_and_seeded_sample():
    moments = torch.randn(2, 8, 4, 4) * 3
    moments[:, 4:, 0, 0] = torch.tensor([-50.0, 40.0])[:, None]  # beyond the logvar clamp
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert torch.equal(ours.mode(), ref.mode())
    assert torch.equal(ours.logvar, ref.logvar)
    assert torch.equal(ours.std, ref.std)
    sample = ours.sample(torch.Generator().manual_seed(42))
    noise = torch.randn(ours.mean.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(sample, ours.mean + ours.std * noise)
    assert torch.equal(sample, ref.sample(torch.Generator().manual_seed(42)))


def test_presets():
    assert SD_VAE.scale_factor == 0.18215 and SDXL_VAE.scale_factor == 0.13025
    assert SD_VAE.ch_mult == SDXL_VAE.ch_mult == (1, 2, 4, 4)


@pytest.mark.slow
def test_full_size_matches_diffusers():
    torch.manual_seed(0)
    ours = check_parity(SD_VAE, image_size=64, latent_size=8)
    n = sum(p.numel() for p in ours.parameters())
    assert 83.6e6 < n < 83.7e6
