"""The shared classification network.

Why our own stack of MONAI blocks instead of ``monai.networks.nets.Classifier``:
``Classifier`` ends in ``Flatten -> Linear`` over the whole last feature map, so its
head is tied to where a finding sits in the image and carries most of the
parameters. Global mean+max pooling over GroupNorm conv blocks keeps the head
tiny and position-free (the max finds a focal finding, the mean a diffuse one).

Why so few channels: DP-SGD adds noise of the same size to every weight, so the
noise grows with the parameter count while the clipped signal does not. On
pooled synthetic sites (1,685 training images, 64x64, ε = 8) a 25k-parameter
version plateaued at AUC ~0.65 while this 6.3k-parameter one reached ~0.87 with
the same budget; without DP the two are close. The first block keeps full
resolution (stride 1) so that small lesions survive the first layer.
"""

from __future__ import annotations

import logging

import torch
from monai.networks.blocks import Convolution
from torch import nn

logger = logging.getLogger(__name__)

#: Output channels of the conv blocks (about 6.3k parameters in all).
CHANNELS: tuple[int, ...] = (4, 8, 16, 16, 16)
#: Stride of each block: the first keeps full resolution, the others halve it.
STRIDES: tuple[int, ...] = (1, 2, 2, 2, 2)
#: GroupNorm groups per block; Opacus cannot give per-sample gradients through BatchNorm.
NUM_GROUPS = 4
#: The strided blocks halve the image four times; smaller inputs would vanish.
MIN_IMAGE_SIZE = 2 ** sum(1 for s in STRIDES if s > 1)


class SmallCTNet(nn.Module):
    """Five conv blocks (GroupNorm, ReLU; four strided), global mean+max pool, one logit.

    Global pooling makes the prediction independent of where the finding lies
    and of the input size, and keeps the head at ``2 * CHANNELS[-1] + 1``
    weights, which matters when every weight receives DP noise.
    """

    def __init__(
        self, image_size: int = 64, channels: tuple[int, ...] = CHANNELS, strides: tuple[int, ...] = STRIDES
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"{len(channels)} channel counts for {len(strides)} strides; give one stride per block")
        self.image_size = image_size
        blocks: list[nn.Module] = []
        in_ch = 1
        for out_ch, stride in zip(channels, strides, strict=True):
            blocks.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    strides=stride,
                    kernel_size=3,
                    act="relu",
                    norm=("group", {"num_groups": min(NUM_GROUPS, out_ch)}),
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, S, S)`` images to ``(B, 1)`` logits."""
        x = self.features(x)
        # Parameter-free pooling: nothing here needs Opacus per-sample gradients.
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def build_model(image_size: int = 64) -> nn.Module:
    """Build the consortium's model for ``image_size`` x ``image_size`` single-channel inputs.

    Every site and the coordinator call this with the same settings so that the
    parameter arrays line up; the result passes Opacus' strict validation.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (got {image_size})")
    model = SmallCTNet(image_size=image_size)
    logger.debug(
        "built SmallCTNet for %dx%d inputs, %d parameters",
        image_size,
        image_size,
        sum(p.numel() for p in model.parameters()),
    )
    return model
