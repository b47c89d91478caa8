"""A conditional VAE on Fashion-MNIST with pyro_vae's public API: p(x | z, y) p(z) and q(z | x, y),
the class label y read by the decoder and the guide, trained with Pyro's own SVI loop; then one row of
draws per class (classes.png).

    python examples/cvae.py -n 10                 # CPU
    python examples/cvae.py -n 10 --cuda --out classes.png
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, nets, plots

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def batches(x, y, size, generator=None):
    """Minibatches ``(x_b, y_b)``: shuffled with ``generator``, in order without it."""
    order = torch.randperm(len(x), generator=generator, device=x.device) if generator is not None \
        else torch.arange(len(x), device=x.device)
    for i in order.split(size):
        yield x[i], y[i]


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")

    x_train, y_train, x_test, y_test = data.load_images("fashion-mnist", args.data_dir)
    x_test = data.binarize(x_test, torch.Generator().manual_seed(args.seed + 1))
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    generator = torch.Generator(device=device).manual_seed(args.seed)

    # the decoder reads z (50) beside the one-hot label (10); the guide's head reads the encoder's 400
    # features beside it
    k = len(CLASSES)
    vae = VAE(encoder=nets.MLPEncoder((1, 28, 28), hidden=(400,)),
              decoder=nets.MLPDecoder(50 + k, (1, 28, 28), hidden=(400,)),
              latent_dims=[50], condition=k).to(device)
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.learning_rate}), loss=Trace_ELBO())

    for epoch in range(1, args.num_epochs + 1):
        train_loss = sum(svi.step(data.binarize(x, generator), y)  # dynamic binarisation
                         for x, y in batches(x_train, y_train, 256, generator)) / len(x_train)
        test_loss = sum(svi.evaluate_loss(x, y) for x, y in batches(x_test, y_test, 1000)) / len(x_test)
        print(f"[epoch {epoch:03d}]  average training loss: {train_loss:.4f}  test ELBO log p(x | y) >= "
              f"{-test_loss:.4f}", flush=True)
    plots.save_classes(vae, args.out, n=10, names=CLASSES)
    print(f"wrote {args.out}")
    return vae


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-epochs", default=10, type=int, help="number of training epochs")
    parser.add_argument("-lr", "--learning-rate", default=1.0e-3, type=float, help="learning rate")
    parser.add_argument("--cuda", action="store_true", default=False, help="whether to use cuda")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    parser.add_argument("--out", default="classes.png", help="where to write one row of draws per class")
    main(parser.parse_args())
