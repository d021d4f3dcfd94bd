"""Tiny network configs shared by tests (random weights; seconds to build and train on a CPU)."""

from fvdiffusion.zoo.unet import UNetConfig

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention=True, num_heads=2,
                       num_groups=4)


def interrupt_training_at(monkeypatch, step: int) -> None:
    """Send SIGINT (Ctrl-C) to this process when the resumable training loop's bar reaches ``step``."""
    import os
    import signal

    from fvdiffusion.train import resumable

    class InterruptingBar(resumable.tqdm):
        steps_seen = 0  # a disabled tqdm does not count, so count here

        def update(self, n=1):
            super().update(n)
            InterruptingBar.steps_seen += n
            if InterruptingBar.steps_seen == step:  # the loop stops at the next step boundary
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(resumable, "tqdm", InterruptingBar)
