"""U-Nets over torchvision encoders: a registry of backbone name → encoder class (smp style).

Each encoder yields five feature maps at strides 2, 4, 8, 16, 32; the decoder upsamples
by 2 at each stage, concatenates the skip and applies two 3×3 conv-BN-ReLU blocks.
Input is the slice itself, plus ``context_slices`` neighbours on each side with 2.5-D context
(channels ordered from slice k-c to k+c; the pretrained first conv's summed RGB kernel goes to
the centre channel, the neighbour kernels start at zero). Output is 4-class logits at the
input's H×W (inputs are padded to a multiple of 32 inside and cropped back).

Imports ``config`` only; nothing of ``data`` or the stages above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raysegment.config import ModelConfig

__all__ = ["AUX_PREFIX", "BACKBONES", "ENCODERS", "ModelConfig", "UNet", "build_model", "first_conv_key",
           "imagenet_file", "with_context"]

Weights = Literal["imagenet"] | None
AUX_PREFIX = "aux_heads."  # state-dict keys of the deep-supervision heads (training only)


class WeightsNotFoundError(FileNotFoundError):
    pass


def _hub_file(weights_enum) -> tuple[Path, str]:
    url = weights_enum.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def imagenet_file(backbone: str) -> tuple[Path, str]:
    """(where torchvision's hub cache keeps ``backbone``'s ImageNet weights on this machine, their URL)."""
    return _hub_file(ENCODERS[backbone].imagenet_weights())


def _imagenet_state_dict(weights_enum) -> dict:
    """Load ImageNet weights from the torch hub cache through torchvision's weights API.

    Offline machines cannot download, so a missing file is a clear error naming the path.
    """
    path, url = _hub_file(weights_enum)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights not found at {path}. Download {url} on a machine with internet access "
            f"and copy it there (or set TORCH_HOME), or use weights=None for random initialisation."
        )
    # torchvision's loader reads the cached file with torch.load(weights_only=True).
    return weights_enum.get_state_dict(progress=False, check_hash=False)


def _grey_input(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The same conv taking ``in_channels`` grey channels.

    The centre channel gets the summed RGB kernels (grey = R = G = B); neighbour channels start
    at zero, so a fresh 2.5-D network computes exactly what its 2-D self does.
    """
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, in_channels // 2] = conv.weight.sum(dim=1)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class DenseNet121Encoder(nn.Module):
    channels = (64, 256, 512, 1024, 1024)
    first_conv = "stem.0"  # parameter path of the input conv

    @staticmethod
    def imagenet_weights():
        from torchvision.models import DenseNet121_Weights

        return DenseNet121_Weights.IMAGENET1K_V1

    def __init__(self, weights: Weights, in_channels: int = 1):
        super().__init__()
        from torchvision.models import densenet121

        net = densenet121(weights=None)
        if weights == "imagenet":
            # DenseNet's checkpoint has legacy key names; torchvision's own loader renames them.
            from torchvision.models.densenet import _load_state_dict

            _imagenet_state_dict(self.imagenet_weights())  # clear error when missing
            _load_state_dict(net, self.imagenet_weights(), progress=False)
        f = net.features
        f.conv0 = _grey_input(f.conv0, in_channels)
        self.in_channels = in_channels
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0)  # /2
        self.stage1 = nn.Sequential(f.pool0, f.denseblock1)  # /4
        self.stage2 = nn.Sequential(f.transition1, f.denseblock2)  # /8
        self.stage3 = nn.Sequential(f.transition2, f.denseblock3)  # /16
        self.stage4 = nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True))  # /32

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.stage1(x0)
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        return [x0, x1, x2, x3, self.stage4(x3)]


class MobileNetV2Encoder(nn.Module):
    channels = (16, 24, 32, 96, 1280)
    _cuts = (2, 4, 7, 14, 19)  # features[:2] → /2, [2:4] → /4, ... [14:19] → /32
    first_conv = "stages.0.0.0"

    @staticmethod
    def imagenet_weights():
        from torchvision.models import MobileNet_V2_Weights

        return MobileNet_V2_Weights.IMAGENET1K_V2

    def __init__(self, weights: Weights, in_channels: int = 1):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        if weights == "imagenet":
            net.load_state_dict(_imagenet_state_dict(self.imagenet_weights()))
        f = net.features
        f[0][0] = _grey_input(f[0][0], in_channels)
        self.in_channels = in_channels
        starts = (0,) + self._cuts[:-1]
        self.stages = nn.ModuleList(nn.Sequential(*f[a:b]) for a, b in zip(starts, self._cuts))

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder + U-Net decoder. Decoder widths are (8w, 4w, 2w, w, w/2) from /16 to /1."""

    def __init__(self, encoder: nn.Module, decoder_width: int, num_classes: int, deep_supervision: int = 0):
        super().__init__()
        self.encoder = encoder
        # Slice k plus context_slices neighbours on each side (the Predictor reads it).
        self.context_slices = (encoder.in_channels - 1) // 2
        enc = encoder.channels
        w = decoder_width
        widths = (8 * w, 4 * w, 2 * w, w, max(w // 2, 8))
        skips = (enc[3], enc[2], enc[1], enc[0], 0)
        blocks, cin = [], enc[4]
        for skip, cout in zip(skips, widths):
            blocks.append(_conv_block(cin + skip, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_classes, 1)
        # Heads on the stride-2, 4, 8 decoder outputs (blocks[-2], [-3], [-4]); training only.
        self.aux_heads = nn.ModuleList(nn.Conv2d(widths[-2 - k], num_classes, 1) for k in range(deep_supervision))

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Logits (N, C, H, W); with ``aux`` (deep supervision in training) a list: those, then
        the stride-2, 4, … heads' logits at ⌈H/s⌉×⌈W/s⌉."""
        c = self.encoder.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"expected input (N, {c}, H, W) (context_slices={self.context_slices}), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant")
        feats = self.encoder(x)
        y, levels = feats[-1], []
        for block, skip in zip(self.blocks, list(reversed(feats[:-1])) + [None]):
            y = F.interpolate(y, scale_factor=2, mode="nearest")
            if skip is not None:
                y = torch.cat([y, skip], dim=1)
            y = block(y)
            if aux:  # kept only when asked: in prediction each level is freed once the next is made
                levels.append(y)
        out = self.head(y)[..., :h, :w]
        if not aux:
            return out
        strided = [(head(levels[-2 - k]), 2 ** (k + 1)) for k, head in enumerate(self.aux_heads)]
        return [out] + [z[..., :-(-h // s), :-(-w // s)] for z, s in strided]


# The encoder registry: every --backbone choice list, the 2.5-D widening path and the tests
# derive from it. A new backbone is one encoder class (``channels``, ``first_conv``,
# ``imagenet_weights()`` → torchvision's weights enum, ``__init__(weights, in_channels)``, ``forward``
# → five feature maps) and one entry here.
ENCODERS: dict[str, type[nn.Module]] = {
    "densenet121": DenseNet121Encoder,
    "mobilenet_v2": MobileNetV2Encoder,
}
BACKBONES: tuple[str, ...] = tuple(sorted(ENCODERS))


def first_conv_key(backbone: str) -> str:
    """State-dict key of a U-Net's input conv weight (widened for 2.5-D input)."""
    return f"encoder.{ENCODERS[backbone].first_conv}.weight"


def build_model(config: ModelConfig, weights: Weights = None) -> UNet:
    """Build the U-Net that ``config`` names; ``weights='imagenet'`` loads the cached encoder."""
    if config.backbone not in ENCODERS:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose one of {list(BACKBONES)}")
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    if config.context_slices not in (0, 1):
        raise ValueError(f"context_slices must be 0 or 1 (the shards store one neighbour per side), got {config.context_slices}")
    if not 0 <= config.deep_supervision <= 3:
        raise ValueError(f"deep_supervision must be 0 to 3 (decoder levels at strides 2, 4, 8), got {config.deep_supervision}")
    encoder = ENCODERS[config.backbone](weights, config.in_channels)
    model = UNet(encoder, config.decoder_width, config.num_classes, config.deep_supervision)
    # NHWC weights make oneDNN (and cuDNN) pick their fast conv kernels: a bf16 train step on
    # 2 CPU cores is 1.29× faster for MobileNetV2 and 1.14× for DenseNet-121 (16×128², measured).
    # Callers pass NCHW inputs; the first conv converts them once.
    return model.to(memory_format=torch.channels_last)


def with_context(volume: torch.Tensor, context_slices: int) -> torch.Tensor:
    """(z, H, W) volume → (z, 1 + 2c, H, W) network input: slices k-c … k+c, zeros beyond the stack.

    Zeros (not a repeated edge slice) mark the end of the stack, as ``prepare`` writes them.
    """
    if context_slices == 0:
        return volume[:, None]
    c = context_slices
    padded = F.pad(volume, (0, 0, 0, 0, c, c))
    return torch.stack([padded[i : i + volume.shape[0]] for i in range(2 * c + 1)], dim=1)
