"""A two-level latent chain z0 -> z1 -> x on Fashion-MNIST, trained with each guide.

p(x | z1) p(z1 | z0) p(z0), with the seed's bottom-up guide q(z1 | x) q(z0 | z1)
and the top-down (ladder) guide q(z0 | d0) q(z1 | z0, d1). Both are trained
with Pyro's own SVI loop and a KL warm-up (``vae.kl_weight``, applied by
``poutine.scale`` on the latent sites); then each prints its test ELBO, the
KL and active units of each level, and the importance-weighted log p(x).

    python examples/hierarchical.py -n 10
    python examples/hierarchical.py -n 10 --cuda
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, evaluate, nets, objectives


def train_chain(guide, x_train, x_test, args, device):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = data.Batches(x_train, 256, generator, dynamic_binarize=True)

    # latent_dims top to bottom: z0 has 16 dims, z1 (read by the decoder) 50
    vae = VAE(encoder=nets.MLPEncoder((1, 28, 28), hidden=(400,)),
              decoder=nets.MLPDecoder(50, (1, 28, 28), hidden=(400,)),
              latent_dims=[16, 50], guide=guide, hidden=400).to(device)
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.learning_rate}), loss=Trace_ELBO())
    warmup = objectives.KLWarmup(args.warmup_epochs * len(batches))
    step = 0
    for epoch in range(1, args.num_epochs + 1):
        total = 0.0
        for x in batches:
            vae.kl_weight = warmup(step)  # beta rises from 1/steps to 1
            total += svi.step(x)
            step += 1
        vae.kl_weight = 1.0
        print(f"[{guide} epoch {epoch:03d}]  training loss: {total / len(x_train):.4f}", flush=True)

    vae.eval()
    summary = evaluate.evaluate(vae, x_test, iw_samples=args.iw_samples, progress=False)
    # kl_z<l>: each level's share of the KL in the model's order (comparable across the two guides)
    levels = ", ".join(f"z{i}: KL share {summary[f'kl_z{i}']:.2f} nats, {summary[f'active_units_z{i}']}/{d} active"
                       for i, d in enumerate(vae.latent_dims))
    print(f"{guide}: test ELBO {summary['elbo']:.2f}  IW log p(x) (K={args.iw_samples}) "
          f"{summary['iw_log_likelihood']:.2f}  [{levels}]", flush=True)
    return summary


def main(args):
    device = torch.device("cuda" if args.cuda else "cpu")
    x_train, _, x_test, _ = data.load_images("fashion-mnist", args.data_dir)
    x_test = data.binarize(x_test, torch.Generator().manual_seed(args.seed + 1))
    x_train, x_test = x_train.to(device), x_test[:args.test_images].to(device)
    return {guide: train_chain(guide, x_train, x_test, args, device) for guide in ("bottom-up", "top-down")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-epochs", default=10, type=int, help="training epochs per guide")
    parser.add_argument("--warmup-epochs", default=2, type=int, help="epochs of KL warm-up (0: none)")
    parser.add_argument("-lr", "--learning-rate", default=1.0e-3, type=float, help="Adam learning rate")
    parser.add_argument("--iw-samples", default=1000, type=int, help="K for the IW estimate")
    parser.add_argument("--test-images", default=10000, type=int, help="test images to evaluate")
    parser.add_argument("--cuda", action="store_true", default=False, help="whether to use cuda")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    main(parser.parse_args())
