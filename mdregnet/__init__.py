"""mdregnet: fast diffeomorphic learning-based registration of 3D brain MRI (TensorFlow/Keras 3).

Modules, following the data flow:
    layers      warp, SVF integration, field resizing, smoothing, image pyramid
    losses      similarity and regularisation terms
    metrics     Dice, Jacobian determinant, folding, SDlogJ, inverse consistency (numpy)
    models      one factory, `mdregnet.models.build(name, input_shape, **hparams)`
"""

__version__ = "0.1.0"
