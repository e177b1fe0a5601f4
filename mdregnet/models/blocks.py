"""Convolutional building blocks shared by the registration networks (2D and 3D)."""

import keras


def conv(x, filters, strides=1, kernel_size=3, activation="leaky_relu", name=None):
    """`ndims`-D convolution ('same' padding) followed by LeakyReLU(0.2) (VoxelMorph's slope).

    Args:
        x: `(B, *spatial, C)` Keras tensor; ndims is inferred from its rank.
        filters: output channels.
        strides: 1, or 2 to halve every spatial size.
        activation: 'leaky_relu' (negative slope 0.2) or None for a linear output.
    """
    ndims = len(x.shape) - 2
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    x = layer(filters, kernel_size, strides=strides, padding="same", name=name)(x)
    if activation == "leaky_relu":
        x = keras.layers.LeakyReLU(negative_slope=0.2, name=None if name is None else name + "_act")(x)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return x


def deconv(x, filters, strides=2, kernel_size=3, name=None):
    """Transposed convolution (doubles every spatial size for stride 2) + LeakyReLU(0.2)."""
    ndims = len(x.shape) - 2
    layer = keras.layers.Conv3DTranspose if ndims == 3 else keras.layers.Conv2DTranspose
    x = layer(filters, kernel_size, strides=strides, padding="same", name=name)(x)
    return keras.layers.LeakyReLU(negative_slope=0.2,
                                  name=None if name is None else name + "_act")(x)


def upsample(x, size=2, name=None):
    """Nearest-neighbour up-sampling of the spatial axes (VoxelMorph's decoder)."""
    ndims = len(x.shape) - 2
    layer = keras.layers.UpSampling3D if ndims == 3 else keras.layers.UpSampling2D
    return layer(size, name=name)(x)


def flow_head(x, ndims, stddev=1e-5, name=None):
    """Output convolution to an `ndims`-channel field, no activation, weights ~ N(0, stddev).

    The tiny initialisation (VoxelMorph's choice; the papers are silent) starts training from the
    identity transform.
    """
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    return layer(ndims, 3, padding="same", name=name,
                 kernel_initializer=keras.initializers.RandomNormal(stddev=stddev),
                 bias_initializer="zeros")(x)
