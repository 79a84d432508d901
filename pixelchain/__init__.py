"""pixelchain: exact-likelihood autoregressive image models in PyTorch.

    import pixelchain as pc
    train = pc.data.load("binarized_mnist", split="train")      # .images int64 [N, 1, 28, 28]
    model = pc.create("gated_pixelcnn", image_shape=(1, 28, 28), num_levels=2)
    pc.fit(model, train, pc.data.load("binarized_mnist", split="valid"), run_dir="runs/gated")
    x = model.sample(16)                                         # int64 [16, 1, 28, 28]
    model.log_prob(x)                                            # exact log p(x), nats, [16]
    model = pc.load("runs/gated")                                # safetensors + JSON, no pickle
    data = pc.compress(model, x); pc.decompress(data, model)     # lossless, ~ -log2 p(x) bits
"""

__version__ = "0.1.0"

from . import classifiers, data  # noqa: E402
from .checkpoint import load, pretrained, save  # noqa: E402
from .codec import compress, decompress  # noqa: E402
from .models import create, list_models  # noqa: E402
from .train import TrainingDiverged, TrainOptions, evaluate, fit  # noqa: E402

__all__ = [
    "TrainOptions", "TrainingDiverged", "__version__", "classifiers", "compress", "create", "data", "decompress",
    "evaluate", "fit",
    "list_models", "load",
    "pretrained", "save",
]
