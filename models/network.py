"""The shared classification network: a fixed scattering front end and a small trained head.

Why a fixed front end: DP-SGD noises every trained weight, and a CNN that must
learn its own blob and edge detectors from noised gradients wastes much of its
budget on the way. The previous end-to-end 6.3k-parameter CNN sat at the
prevalence for the first quarter of a run; in-process FedAvg with DP at ε = 8
on the 4,000-patient synthetic hospitals of bench/utility.py ended at AUC 0.875
(mean of 6 noise seeds) against 0.908 for pooled non-private training. With
the scattering front end (`models.scattering`; Tramèr & Boneh 2021) the head
learns from the first round and the same loop ends at 0.896 against 0.914
(README, Differential privacy, has the table).

Why our own stack of MONAI blocks instead of ``monai.networks.nets.Classifier``:
``Classifier`` ends in ``Flatten -> Linear`` over the whole last feature map, so
its head is tied to where a finding sits and carries most of the parameters.
Global mean+max pooling keeps the head tiny and position-free (the max finds a
focal finding, the mean a diffuse one).
"""

from __future__ import annotations

import logging

import torch
from monai.networks.blocks import Convolution
from torch import nn

from models.scattering import Scattering2D, num_coefficients

logger = logging.getLogger(__name__)

#: Scales of the scattering front end: its output is the image subsampled by 2**J.
SCATTERING_J = 2
#: Orientations per scale.
SCATTERING_L = 8
#: Output channels of the head's conv blocks (about 8.4k trained parameters in all).
CHANNELS: tuple[int, ...] = (16, 16, 16, 16)
#: Kernel of each block: a 1x1 mixing of the scattering channels, then 3x3 convolutions.
KERNELS: tuple[int, ...] = (1, 3, 3, 3)
#: Stride of each block: two keep the scattering grid, the last two halve it.
STRIDES: tuple[int, ...] = (1, 1, 2, 2)
#: GroupNorm groups per block; Opacus cannot give per-sample gradients through BatchNorm.
NUM_GROUPS = 4
#: Groups of the parameter-free normalisation of the scattering coefficients (81 = 9 x 9).
INPUT_GROUPS = 9
#: The image must be a multiple of 2**J, and the head's grid must survive its two halvings.
IMAGE_MULTIPLE = 2**SCATTERING_J
MIN_IMAGE_SIZE = IMAGE_MULTIPLE * 2 ** sum(1 for s in STRIDES if s > 1)


class ScatterHead(nn.Module):
    """What is trained: normalise the coefficients, four conv blocks, global mean+max pool, the logits.

    Global pooling makes the prediction independent of where the finding lies
    and of the input size, and keeps the last layer at ``(2 * CHANNELS[-1] + 1)``
    weights per output, which matters when every weight receives DP noise.
    """

    def __init__(self, in_channels: int, num_outputs: int = 1) -> None:
        super().__init__()
        groups = INPUT_GROUPS if in_channels % INPUT_GROUPS == 0 else 1
        # Per-image normalisation without parameters (Tramèr & Boneh normalise the
        # scattering output the same way): scanners differ in gain and noise.
        blocks: list[nn.Module] = [nn.GroupNorm(groups, in_channels, affine=False)]
        in_ch = in_channels
        for out_ch, kernel, stride in zip(CHANNELS, KERNELS, STRIDES, strict=True):
            blocks.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    strides=stride,
                    kernel_size=kernel,
                    act="relu",
                    norm=("group", {"num_groups": min(NUM_GROUPS, out_ch)}),
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * in_ch, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, s, s)`` scattering coefficients to ``(B, num_outputs)`` logits."""
        x = self.features(x)
        # Parameter-free pooling: nothing here needs Opacus per-sample gradients.
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


class ScatterCTNet(nn.Module):
    """Scattering (fixed, no parameters) then the trained head: ``(B, 1, S, S)`` images to ``(B, K)`` logits.

    ``fixed_front`` and ``trainable`` name the two parts so that training and
    evaluation can compute the front end's output once per dataset
    (`models.features`) and run only the head per step; ``model(x)`` is always
    ``trainable(fixed_front(x))``. The state dict holds the head's tensors only.
    """

    def __init__(self, image_size: int = 64, num_outputs: int = 1) -> None:
        super().__init__()
        self.image_size = image_size
        self.scattering = Scattering2D(image_size, J=SCATTERING_J, L=SCATTERING_L)
        self.classifier = ScatterHead(num_coefficients(SCATTERING_J, SCATTERING_L), num_outputs)

    @property
    def fixed_front(self) -> nn.Module:
        return self.scattering

    @property
    def trainable(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.scattering(x))


def build_model(image_size: int = 64) -> nn.Module:
    """The default study's network (scattering head, one logit) for ``image_size`` px single-channel inputs.

    Kept for callers that predate studies; it is `models.registry.build_network` of
    the default study at this size, so both give the same parameter layout.
    """
    if image_size < MIN_IMAGE_SIZE or image_size % IMAGE_MULTIPLE:
        raise ValueError(
            f"image_size must be a multiple of {IMAGE_MULTIPLE} and at least {MIN_IMAGE_SIZE} (got {image_size}); "
            "the scattering front end subsamples by 4 and the head halves its grid twice"
        )
    from models.registry import build_network
    from models.study import DEFAULT_STUDY

    return build_network(DEFAULT_STUDY.model_copy(update={"image_size": image_size}))
