"""Encoder and decoder networks (plain ``torch.nn``).

Conventions every network here follows, and that a user's own networks must
follow to plug into :class:`pyro_vae.VAE`:

* an **encoder** maps data ``x`` of shape ``(*batch, *x_shape)`` to features of
  shape ``(*batch, out_features)`` and has an integer attribute
  ``out_features``;
* a **decoder** maps a latent ``z`` of shape ``(*batch, latent_dim)`` to the
  likelihood's parameters, of shape ``(*batch, k * x_shape[0], *x_shape[1:])``
  where ``k = likelihood.channels`` (the likelihood splits them along that
  dimension).

``*batch`` may be several dims (Pyro's vectorised particles add one), so the
networks flatten leading dims themselves.
"""

import math

import torch
from torch import nn

from .errors import InputError


def _check_x_shape(x_shape):
    x_shape = tuple(int(s) for s in x_shape)
    if not x_shape or any(s <= 0 for s in x_shape):
        raise InputError(f"x_shape must be a non-empty tuple of positive sizes, got {x_shape}; "
                         "pass the shape of one data point, e.g. (1, 28, 28)")
    return x_shape


_CONV_FLAGS = "--arch mlp, or --image-size N with N a multiple of 4"  # other networks or sizes for the conv nets


def _check_image_shape(x_shape, who, alternative, command_line, multiple=4):
    """``x_shape`` checked to be ``(C, H, W)`` with H and W multiples of ``multiple`` (1: any size); the error names
    ``who`` and the ``alternative`` network for other shapes (``command_line``: the flags that choose it)."""
    x_shape = _check_x_shape(x_shape)
    if len(x_shape) != 3 or x_shape[1] % multiple or x_shape[2] % multiple:
        sizes = f" with H and W multiples of {multiple}" if multiple > 1 else ""
        raise InputError(f"{who} needs images of shape (C, H, W){sizes}, got {x_shape}; use {alternative} for other "
                         f"shapes (on the command line: {command_line})")
    return x_shape


def _check_width(name, value):
    if int(value) <= 0:
        raise InputError(f"{name} must be a positive integer, got {value}; use a {name} of 1 or more")
    return int(value)


def _mlp(sizes, activation):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _check_input(net, x, event_shape):
    n = len(event_shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n:]) != tuple(event_shape):
        raise InputError(
            f"{type(net).__name__} expects inputs of shape (batch, {', '.join(map(str, event_shape))}), "
            f"got {tuple(x.shape)}; reshape the data or build the network for this shape"
        )


class _FlatEncoder(nn.Module):
    """An encoder whose ``net`` reads the flattened data point: ``(*batch, *x_shape) -> (*batch, out_features)``."""

    def _shapes(self, x_shape, hidden, example):
        """Check and set ``x_shape`` and ``out_features`` (the last hidden width); the checked widths."""
        self.x_shape = _check_x_shape(x_shape)
        hidden = [_check_width("hidden width", h) for h in hidden]
        if not hidden:
            raise InputError(f"{type(self).__name__} needs at least one hidden layer; pass e.g. hidden={example}")
        self.out_features = hidden[-1]
        return hidden

    def forward(self, x):
        _check_input(self, x, self.x_shape)
        batch = x.shape[: x.dim() - len(self.x_shape)]
        return self.net(x.reshape(*batch, -1))


class _FlatDecoder(nn.Module):
    """A decoder whose ``net`` maps z to the flattened parameters: ``(*batch, latent_dim) -> (*batch, *out_shape)``."""

    def forward(self, z):
        _check_input(self, z, (self.latent_dim,))
        return self.net(z).reshape(*z.shape[:-1], *self.out_shape)


class GatedDense(nn.Module):
    """A gated linear layer (Dauphin et al. 2017), as the VampPrior paper's networks use:
    ``h(x) = (W x + b) * sigmoid(V x + c)``, ``(*batch, in_features) -> (*batch, out_features)``."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


def _gated(sizes):
    return nn.Sequential(*(GatedDense(a, b) for a, b in zip(sizes[:-1], sizes[1:])))


class GatedMLPEncoder(_FlatEncoder):
    """The VampPrior paper's encoder: gated layers, ``(*batch, *x_shape) -> (*batch, hidden[-1])``.

    Args:
        x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        hidden: widths of the :class:`GatedDense` layers (the paper: ``(300, 300)``).
    """

    def __init__(self, x_shape, hidden=(300, 300)):
        super().__init__()
        hidden = self._shapes(x_shape, hidden, "(300, 300)")
        self.net = _gated([math.prod(self.x_shape), *hidden])


class GatedMLPDecoder(_FlatDecoder):
    """The VampPrior paper's decoder: gated layers then a linear map to the likelihood's parameters,
    ``(*batch, latent_dim) -> (*batch, k*C, *x_shape[1:])``.

    Args:
        latent_dim: size of the latent vector it decodes.
        x_shape: shape of one data point.
        hidden: widths of the :class:`GatedDense` layers (the paper: ``(300, 300)``).
        out_channels: ``k = likelihood.channels``.
    """

    def __init__(self, latent_dim, x_shape, hidden=(300, 300), out_channels=1):
        super().__init__()
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.x_shape = _check_x_shape(x_shape)
        self.out_channels = _check_width("out_channels", out_channels)
        self.out_shape = (self.out_channels * self.x_shape[0], *self.x_shape[1:])
        hidden = [_check_width("hidden width", h) for h in hidden]
        if not hidden:
            raise InputError("GatedMLPDecoder needs at least one hidden layer; pass e.g. hidden=(300, 300)")
        self.net = nn.Sequential(_gated([self.latent_dim, *hidden]), nn.Linear(hidden[-1], math.prod(self.out_shape)))


class MLPEncoder(_FlatEncoder):
    """Fully connected encoder: ``(*batch, *x_shape) -> (*batch, hidden[-1])``.

    Args:
        x_shape: shape of one data point, e.g. ``(1, 28, 28)`` or ``(784,)``.
        hidden: widths of the hidden layers; the last is ``out_features``.
        activation: activation class applied after every layer.
    """

    def __init__(self, x_shape, hidden=(400,), activation=nn.Softplus):
        super().__init__()
        hidden = self._shapes(x_shape, hidden, "(400,)")
        self.net = nn.Sequential(_mlp([math.prod(self.x_shape), *hidden], activation), activation())


class MLPDecoder(_FlatDecoder):
    """Fully connected decoder: ``(*batch, latent_dim) -> (*batch, k*C, *x_shape[1:])``.

    Args:
        latent_dim: size of the latent vector it decodes.
        x_shape: shape of one data point.
        hidden: widths of the hidden layers.
        out_channels: ``k``, the number of parameters per data value that the
            likelihood needs (``likelihood.channels``).
        activation: activation class applied after every hidden layer.
    """

    def __init__(self, latent_dim, x_shape, hidden=(400,), out_channels=1, activation=nn.Softplus):
        super().__init__()
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.x_shape = _check_x_shape(x_shape)
        self.out_channels = _check_width("out_channels", out_channels)
        self.out_shape = (self.out_channels * self.x_shape[0], *self.x_shape[1:])
        hidden = [_check_width("hidden width", h) for h in hidden]
        self.net = nn.Sequential(
            _mlp([self.latent_dim, *hidden], activation),
            activation() if hidden else nn.Identity(),
            nn.Linear(hidden[-1] if hidden else self.latent_dim, math.prod(self.out_shape)),
        )


class _ImageEncoder(nn.Module):
    """An encoder of ``(*batch, *x_shape)`` images through ``self.net`` (which ends flattened) to
    ``(*batch, out_features)``."""

    def forward(self, x):
        _check_input(self, x, self.x_shape)
        batch = x.shape[:-3]
        return self.net(x.reshape(-1, *self.x_shape)).reshape(*batch, self.out_features)


class ConvEncoder(_ImageEncoder):
    """Fully convolutional encoder for images: ``(*batch, C, H, W) -> (*batch, features)``.

    Two stride-2 convolutions (H -> H/2 -> H/4) and one convolution whose
    kernel covers the remaining ``H/4 x W/4`` map, so the output is a
    ``features``-channel 1x1 map, flattened. ``H`` and ``W`` must be multiples
    of 4 (at least 4: 28 x 28 Fashion-MNIST and 32 x 32 CIFAR-10 work; they need
    not be equal) and ``C`` is any number of channels (1 grey, 3 colour).
    """

    def __init__(self, x_shape, channels=(32, 64), features=256, activation=nn.ReLU):
        super().__init__()
        self.x_shape = _check_image_shape(x_shape, "ConvEncoder", "MLPEncoder", _CONV_FLAGS)
        c, h, w = self.x_shape
        c1, c2 = (_check_width("conv channels", ch) for ch in channels)
        self.out_features = _check_width("features", features)
        self.net = nn.Sequential(
            nn.Conv2d(c, c1, 4, 2, 1), activation(),
            nn.Conv2d(c1, c2, 4, 2, 1), activation(),
            nn.Conv2d(c2, self.out_features, (h // 4, w // 4)), activation(),
            nn.Flatten(),
        )


class ConvDecoder(nn.Module):
    """Fully convolutional decoder: ``(*batch, latent_dim) -> (*batch, k*C, H, W)``.

    The latent is read as a ``latent_dim``-channel 1x1 map; one transposed
    convolution grows it to ``H/4 x W/4``, two stride-2 transposed
    convolutions to ``H x W`` (the sizes :class:`ConvEncoder` takes), with
    ``k * C`` output channels.
    """

    def __init__(self, latent_dim, x_shape, channels=(64, 32), out_channels=1, activation=nn.ReLU):
        super().__init__()
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.x_shape = _check_image_shape(x_shape, "ConvDecoder", "MLPDecoder", _CONV_FLAGS)
        c, h, w = self.x_shape
        c1, c2 = (_check_width("conv channels", ch) for ch in channels)
        self.out_channels = _check_width("out_channels", out_channels)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(self.latent_dim, c1, (h // 4, w // 4)), activation(),
            nn.ConvTranspose2d(c1, c2, 4, 2, 1), activation(),
            nn.ConvTranspose2d(c2, self.out_channels * c, 4, 2, 1),
        )

    def forward(self, z):
        _check_input(self, z, (self.latent_dim,))
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, self.latent_dim, 1, 1))
        return out.reshape(*batch, *out.shape[1:])


class GatedConv2d(nn.Module):
    """A gated convolution (Dauphin et al. 2017), as the VampPrior paper's conv networks use:
    ``h(x) = conv_h(x) * sigmoid(conv_g(x))``, ``(N, in_channels, H, W) -> (N, out_channels, H', W')``, both
    convolutions ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConvEncoder(_ImageEncoder):
    """The VampPrior paper's conv encoder (its ConvHVAE's q(z2 | x)): five :class:`GatedConv2d` layers,
    ``(*batch, C, H, W) -> (*batch, out_features)``. Kernels 7, 3, 5, 3, 3; the second and fourth have stride 2
    (H -> ceil(H/2) -> ceil(H/4)); the last has 6 channels, flattened: ``out_features = 6 * ceil(H/4) *
    ceil(W/4)`` (294 for 28 x 28). Any H and W of at least 1 work.

    Args:
        x_shape: ``(C, H, W)``.
        channels: the first four layers' channels (the paper: ``(32, 32, 64, 64)``).
    """

    def __init__(self, x_shape, channels=(32, 32, 64, 64)):
        super().__init__()
        self.x_shape = _check_image_shape(x_shape, "GatedConvEncoder", "GatedMLPEncoder", "--arch gated",
                                           multiple=1)
        if not isinstance(channels, (tuple, list)) or len(channels) != 4:
            raise InputError(f"GatedConvEncoder needs 4 channel counts, got {channels!r}; use e.g. (32, 32, 64, 64)")
        c1, c2, c3, c4 = (_check_width("conv channels", ch) for ch in channels)
        c, h, w = self.x_shape
        self.net = nn.Sequential(GatedConv2d(c, c1, 7, 1, 3), GatedConv2d(c1, c2, 3, 2, 1),
                                 GatedConv2d(c2, c3, 5, 1, 2), GatedConv2d(c3, c4, 3, 2, 1),
                                 GatedConv2d(c4, 6, 3, 1, 1), nn.Flatten())
        self.out_features = 6 * -(-h // 4) * -(-w // 4)


class GatedConvDecoder(nn.Module):
    """The VampPrior paper's conv decoder (its ConvHVAE's p(x | z1, z2)): two :class:`GatedDense` layers
    (``latent_dim -> hidden -> C*H*W``), the result read as a ``(C, H, W)`` image, ``layers`` :class:`GatedConv2d`
    of ``channels`` channels (kernel 3, full resolution), then a 1x1 convolution to the likelihood's parameters:
    ``(*batch, latent_dim) -> (*batch, k*C, H, W)``. One difference: the first gated layer reads every level at
    once, ``hidden`` wide, where the paper's code gives each level one of 300 and joins them (600 wide), as this
    library's gated MLP decoder does too.

    Args:
        latent_dim: size of the latent vector it decodes (with skip connections, every level's, concatenated).
        x_shape: ``(C, H, W)``.
        hidden: width of the first gated layer.
        channels, layers: the gated convolutions (the paper: 64 channels, 4 layers).
        out_channels: ``k = likelihood.channels``.
    """

    def __init__(self, latent_dim, x_shape, hidden=300, channels=64, layers=4, out_channels=1):
        super().__init__()
        self.latent_dim = _check_width("latent_dim", latent_dim)
        self.x_shape = _check_image_shape(x_shape, "GatedConvDecoder", "GatedMLPDecoder", "--arch gated",
                                           multiple=1)
        self.out_channels = _check_width("out_channels", out_channels)
        c, width = self.x_shape[0], _check_width("conv channels", channels)
        self.dense = _gated([self.latent_dim, _check_width("hidden width", hidden), math.prod(self.x_shape)])
        layers = _check_width("number of layers", layers)
        convs = [GatedConv2d(c if i == 0 else width, width, 3, 1, 1) for i in range(layers)]
        self.net = nn.Sequential(*convs, nn.Conv2d(width, self.out_channels * c, 1))

    def forward(self, z):
        _check_input(self, z, (self.latent_dim,))
        batch = z.shape[:-1]
        out = self.net(self.dense(z.reshape(-1, self.latent_dim)).reshape(-1, *self.x_shape))
        return out.reshape(*batch, *out.shape[1:])


class Log1p(nn.Module):
    """An encoder reading ``log(1 + x)``: ``(*batch, *x_shape) -> encoder's output``, the usual
    normalising input for count data (scVI's encoder reads it). ``x_shape`` and ``out_features`` are the
    wrapped encoder's."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.x_shape = getattr(encoder, "x_shape", None)
        if hasattr(encoder, "out_features"):
            self.out_features = encoder.out_features

    def forward(self, x):
        return self.encoder(torch.log1p(x))


def build(arch, x_shape, latent_dim, out_channels=1, hidden=400):
    """The encoder and decoder of a named architecture.

    Args:
        arch: ``"mlp"`` (Pyro tutorial: one softplus hidden layer of width
            ``hidden``), ``"gated"`` (the VampPrior paper's: two
            :class:`GatedDense` layers of width ``hidden`` each way),
            ``"conv"`` (:class:`ConvEncoder`/:class:`ConvDecoder`) or
            ``"gated-conv"`` (the VampPrior paper's ConvHVAE networks,
            :class:`GatedConvEncoder`/:class:`GatedConvDecoder`).
        x_shape: shape of one data point.
        latent_dim: size of the latent the decoder reads.
        out_channels: parameters per data value the likelihood needs.

    Returns:
        ``(encoder, decoder)``.
    """
    if arch == "mlp":
        return (MLPEncoder(x_shape, hidden=(hidden,)),
                MLPDecoder(latent_dim, x_shape, hidden=(hidden,), out_channels=out_channels))
    if arch == "gated":
        return (GatedMLPEncoder(x_shape, hidden=(hidden, hidden)),
                GatedMLPDecoder(latent_dim, x_shape, hidden=(hidden, hidden), out_channels=out_channels))
    if arch == "conv":
        return ConvEncoder(x_shape), ConvDecoder(latent_dim, x_shape, out_channels=out_channels)
    if arch == "gated-conv":
        return (GatedConvEncoder(x_shape),
                GatedConvDecoder(latent_dim, x_shape, hidden=hidden, out_channels=out_channels))
    raise InputError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")


ARCHS = ("mlp", "conv", "gated", "gated-conv")
IMAGE_ARCHS = ("conv", "gated-conv")  # networks that read (C, H, W) images only
