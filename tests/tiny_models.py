"""Tiny network configs shared by tests (random weights; seconds to build and train on a CPU)."""

from fvdiffusion.zoo.unet import UNetConfig

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention=True, num_heads=2,
                       num_groups=4)
