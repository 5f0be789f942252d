"""Run inside a separate venv that has pythae 0.1.2 (never a dependency of vae): trains pythae's VAE with
the *same* encoder/decoder networks as `vae` (imported from vae_cli/models/nets.py, which needs only torch) for
one epoch over the given MNIST tensors, and prints images/s and the test loss as JSON.

    bench-venv/bin/python scripts/pythae_speed.py DATA.npz --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vae_cli.models.nets only (torch, no other deps)

from pythae.data.datasets import BaseDataset  # noqa: E402
from pythae.models import VAE, VAEConfig  # noqa: E402
from pythae.models.base.base_utils import ModelOutput  # noqa: E402
from pythae.models.nn import BaseDecoder, BaseEncoder  # noqa: E402
from pythae.trainers import BaseTrainer, BaseTrainerConfig  # noqa: E402

from vae_cli.models.nets import Decoder, Encoder  # noqa: E402


class Enc(BaseEncoder):
    def __init__(self, shape, cfg):
        BaseEncoder.__init__(self)
        self.body = Encoder(shape, cfg.width, cfg.hidden)
        self.head = torch.nn.Linear(cfg.hidden, 2 * cfg.latent_dim)

    def forward(self, x):
        mu, logvar = self.head(self.body(x)).chunk(2, 1)
        return ModelOutput(embedding=mu, log_covariance=logvar)


class Dec(BaseDecoder):
    def __init__(self, shape, cfg):
        BaseDecoder.__init__(self)
        self.body = Decoder(shape, cfg.width, cfg.hidden, cfg.latent_dim)

    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.body(z)))  # pythae's BCE wants probabilities


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    d = np.load(args.data)
    train_x, test_x = torch.from_numpy(d["train_x"]), torch.from_numpy(d["test_x"])
    shape = tuple(train_x.shape[1:])
    cfg = SimpleNamespace(width=args.width, hidden=args.hidden, latent_dim=args.latent_dim)
    torch.manual_seed(0)
    model = VAE(VAEConfig(input_dim=shape, latent_dim=args.latent_dim, reconstruction_loss="bce"),
                encoder=Enc(shape, cfg), decoder=Dec(shape, cfg))
    tcfg = BaseTrainerConfig(output_dir="/tmp/pythae-bench", per_device_train_batch_size=args.batch_size,
                             num_epochs=1, learning_rate=args.lr, no_cuda=True)
    trainer = BaseTrainer(model, train_dataset=BaseDataset(train_x, torch.zeros(len(train_x))), training_config=tcfg)
    trainer.prepare_training()  # optimizer, callbacks, output folder: what train() does before epoch 1
    t0 = time.perf_counter()
    trainer.train_step(epoch=1)  # exactly one pass over the training images
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        losses = [model({"data": xb}).loss.item() * len(xb) for xb in test_x.split(500)]
    print(json.dumps({"images": len(train_x), "seconds": seconds, "images_per_s": len(train_x) / seconds,
                      "test_neg_elbo": sum(losses) / len(test_x), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
