"""Convolutional building blocks shared by the registration networks (2D and 3D).

Mixed precision: under a global Keras policy such as 'mixed_bfloat16' (`mdregnet.train
--mixed_precision bf16`), `conv`, `deconv` and `upsample` compute in that policy's dtype, while the
flow head and everything built with `FLOAT32` (integration, warps, resizing, smoothing, the
image pyramid and the arithmetic on fields) keep float32: a displacement in bfloat16 would have
3 significant digits, 0.25 voxel at 100 voxels. Under the default float32 policy `FLOAT32` changes
nothing (same layers, same weights).
"""

import keras

#: Layer keyword argument that keeps a layer in float32 under any global mixed policy.
FLOAT32 = {"dtype": "float32"}


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
        x = keras.layers.LeakyReLU(negative_slope=0.2,
                                   name=None if name is None else name + "_act")(x)
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
    identity transform. Computed in float32 whatever the global policy (its input is cast).
    """
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    return layer(ndims, 3, padding="same", name=name,
                 kernel_initializer=keras.initializers.RandomNormal(stddev=stddev),
                 bias_initializer="zeros", **FLOAT32)(x)
