"""Pyro's VAE tutorial, on Fashion-MNIST, with pyro_vae's public API.

The same network as https://pyro.ai/examples/vae.html (784-400-50 MLP with
softplus, Bernoulli likelihood, Adam 1e-3, batch 256); the model and guide
are ``vae.model`` and ``vae.guide``, trained with Pyro's own SVI loop.

    python examples/vae.py -n 10            # CPU
    python examples/vae.py -n 10 --cuda --jit
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, likelihoods, nets


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")

    # data: dynamically binarised training images, test images binarised once
    x_train, _, x_test, _ = data.load_images("fashion-mnist", args.data_dir)
    x_test = data.binarize(x_test, torch.Generator().manual_seed(args.seed + 1))
    x_train, x_test = x_train.to(device), x_test.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    train_batches = data.Batches(x_train, 256, generator, dynamic_binarize=True)
    test_batches = data.Batches(x_test, 256, generator, shuffle=False)

    # the tutorial's VAE: z_dim=50, hidden_dim=400
    vae = VAE(encoder=nets.MLPEncoder((1, 28, 28), hidden=(400,)),
              decoder=nets.MLPDecoder(50, (1, 28, 28), hidden=(400,)),
              latent_dims=[50], likelihood=likelihoods.Bernoulli()).to(device)

    elbo = JitTrace_ELBO(ignore_jit_warnings=True) if args.jit else Trace_ELBO()
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.learning_rate}), loss=elbo)

    for epoch in range(1, args.num_epochs + 1):
        train_loss = sum(svi.step(x) for x in train_batches) / len(x_train)
        line = f"[epoch {epoch:03d}]  average training loss: {train_loss:.4f}"
        if epoch % args.test_frequency == 0:
            test_loss = sum(svi.evaluate_loss(x) for x in test_batches) / len(x_test)
            line += f"  test ELBO: {-test_loss:.4f}"
        print(line, flush=True)
    return vae


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="parse args")
    parser.add_argument("-n", "--num-epochs", default=10, type=int, help="number of training epochs")
    parser.add_argument("-tf", "--test-frequency", default=1, type=int, help="how often we evaluate the test set")
    parser.add_argument("-lr", "--learning-rate", default=1.0e-3, type=float, help="learning rate")
    parser.add_argument("--cuda", action="store_true", default=False, help="whether to use cuda")
    parser.add_argument("--jit", action="store_true", default=False, help="whether to use PyTorch jit")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    main(parser.parse_args())
