"""AnimateDiff on an SDXL-style UNet (three levels, the first without attention, the ``text_time``
vector), against diffusers' UNetMotionModel built from its own config (not ``from_unet2d``, which
does not carry an SDXL UNet over): its weights split into the 2-D UNet (loaded by our diffusers
converter) and the motion modules (saved as a diffusers MotionAdapter folder, loaded by ours). One
denoiser call on a clip, the motion modules attached by ``motion_attached`` over the frames flattened."""

from __future__ import annotations

import warnings

import pytest
import torch

from reference import randomize_
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.motion import load_motion_module
from sfumato.models.unet import UNetConfig, UNetModel
from sfumato.pipeline.animate import check_fits, motion_attached

warnings.filterwarnings("ignore", module="diffusers")

TIME_DIM, TEXT_DIM, FRAMES = 8, 16, 6
COMMON = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, use_linear_projection=True,
              norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
              projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM, transformer_layers_per_block=(1, 1, 2))
CFG = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                 num_head_channels=8, context_dim=64, use_linear_in_transformer=True,
                 adm_in_channels=TEXT_DIM + 6 * TIME_DIM, norm_groups=32)


@pytest.mark.parametrize("mid", [True, False], ids=["v2-like", "sdxl-beta-like"])
def test_sdxl_motion_unet_equals_diffusers(mid, tmp_path):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    reference = UNetMotionModel(
        down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion"),
        up_block_types=("CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion", "UpBlockMotion"),
        num_attention_heads=(4, 8, 8), motion_max_seq_length=32, motion_num_attention_heads=8,
        use_motion_mid_block=mid, **COMMON).eval()
    randomize_(reference, 3)
    sd = reference.state_dict()
    unet2d = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                  attention_head_dim=8, **COMMON).eval()
    unet2d.load_state_dict({k: v for k, v in sd.items() if ".motion_modules." not in k}, strict=True)
    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=mid)
    adapter.load_state_dict({k: v for k, v in sd.items() if ".motion_modules." in k}, strict=True)
    adapter.save_pretrained(tmp_path / "adapter")

    ours = UNetModel(CFG).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(unet2d.state_dict(), CFG), strict=True)
    motion = load_motion_module(tmp_path / "adapter")
    check_fits(motion, CFG, "sdxl")
    assert motion.cfg.channels == (32, 64, 64) and motion.cfg.mid == mid

    g = torch.Generator().manual_seed(1)
    b = 2
    x = torch.randn(b, 4, FRAMES, 16, 16, generator=g)
    t = torch.tensor([500.0, 80.0])
    context = torch.randn(b, 7, 64, generator=g)
    text_embeds = torch.randn(b, TEXT_DIM, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context.repeat_interleave(FRAMES, 0),   # per frame, as
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample   # its pipeline
        # the LDM UNet's vector: the pooled text, then the size/crop conditioning's Fourier features
        y = torch.cat([text_embeds, reference.add_time_proj(time_ids.flatten()).reshape(b, -1)], dim=-1)
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * FRAMES, 4, 16, 16)
        with motion_attached(ours, motion, lambda: FRAMES):
            got = ours(flat, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                       y.repeat_interleave(FRAMES, 0))
        still = ours(flat, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                     y.repeat_interleave(FRAMES, 0))
    got = got.reshape(b, FRAMES, 4, 16, 16).permute(0, 2, 1, 3, 4)
    still = still.reshape(b, FRAMES, 4, 16, 16).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert (still - want).abs().max() > 1e-2 * float(want.abs().max()), "the motion modules changed nothing"
