"""The same VAE on Fashion-MNIST with three priors p(z0), or with two posterior
families q(z | x), swapped in one line each.

Standard normal, a mixture of Gaussians and the VampPrior (``--compare
priors``, the default), or the diagonal Gaussian and an IAF posterior
(``--compare posteriors``), each trained with Pyro's own SVI loop on
dynamically binarised Fashion-MNIST (the tutorial's 784-400-50 MLP, Adam
1e-3, batch 256), then the test ELBO and the importance-weighted log p(x) of
each.

    python examples/swap_prior.py -n 10
    python examples/swap_prior.py -n 10 --compare posteriors
    python examples/swap_prior.py -n 10 --cuda
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, evaluate, nets, posteriors, priors

# name -> (prior, posterior family) for each comparison
COMPARE = {
    "priors": {
        "standard normal": lambda args: (priors.StandardNormal(), posteriors.DiagonalGaussian),
        "mixture of Gaussians": lambda args: (priors.MixtureOfGaussians(args.components), posteriors.DiagonalGaussian),
        "VampPrior": lambda args: (priors.VampPrior(args.pseudo_inputs), posteriors.DiagonalGaussian),
    },
    "posteriors": {
        "Gaussian posterior": lambda args: (priors.StandardNormal(), posteriors.DiagonalGaussian),
        "IAF posterior": lambda args: (priors.StandardNormal(), posteriors.iaf(args.flow_steps)),
    },
}


def train_with(prior, posterior, x_train, x_test, args, device):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(encoder=nets.MLPEncoder((1, 28, 28), hidden=(400,)),
              decoder=nets.MLPDecoder(50, (1, 28, 28), hidden=(400,)),
              latent_dims=[50], prior=prior, posterior=posterior).to(device)  # the line that changes
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.learning_rate}), loss=Trace_ELBO())
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for epoch in range(1, args.num_epochs + 1):
        loss = sum(svi.step(x) for x in data.Batches(x_train, 256, generator, dynamic_binarize=True))
        print(f"  epoch {epoch:03d}  training loss: {loss / len(x_train):.4f}", flush=True)
    vae.eval()
    return evaluate.evaluate(vae, x_test, iw_samples=args.iw_samples, progress=False)


def main(args):
    device = torch.device("cuda" if args.cuda else "cpu")
    x_train, _, x_test, _ = data.load_images("fashion-mnist", args.data_dir)
    x_test = data.binarize(x_test, torch.Generator().manual_seed(args.seed + 1))
    x_train, x_test = x_train.to(device), x_test[:args.test_images].to(device)
    results = {}
    for name, make in COMPARE[args.compare].items():
        print(f"{name}:", flush=True)
        results[name] = summary = train_with(*make(args), x_train, x_test, args, device)
        print(f"{name}: test ELBO {summary['elbo']:.2f}  IW log p(x) (K={args.iw_samples}) "
              f"{summary['iw_log_likelihood']:.2f}  KL {summary['kl']:.2f}", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", default="priors", choices=sorted(COMPARE), help="what to swap")
    parser.add_argument("-n", "--num-epochs", default=10, type=int, help="training epochs per model")
    parser.add_argument("-lr", "--learning-rate", default=1.0e-3, type=float, help="Adam learning rate")
    parser.add_argument("--components", default=10, type=int, help="mixture components")
    parser.add_argument("--pseudo-inputs", default=500, type=int, help="VampPrior pseudo-inputs")
    parser.add_argument("--flow-steps", default=2, type=int, help="IAF steps of the IAF posterior")
    parser.add_argument("--iw-samples", default=1000, type=int, help="K for the IW estimate")
    parser.add_argument("--test-images", default=10000, type=int, help="test images to evaluate")
    parser.add_argument("--cuda", action="store_true", default=False, help="whether to use cuda")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    main(parser.parse_args())
