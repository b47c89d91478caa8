"""Semi-supervised M2 on Fashion-MNIST with pyro_vae's public API, after Pyro's ``examples/vae/ss_vae_M2.py``:
the label y is a Pyro site, observed for the few labelled images and summed out by TraceEnum_ELBO for the
rest; with ``--aux-loss`` the classifier also gets alpha * log q(y | x) on the labelled images.

    python examples/ss_vae.py -n 10 -sup 3000 --aux-loss          # CPU
    python examples/ss_vae.py -n 50 -sup 600 -enum sequential --cuda
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, data, nets


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")
    k = 10

    x_train, y_train, x_test, y_test = data.load_images("fashion-mnist", args.data_dir)
    unsup = data.balanced_labels(y_train, args.sup_num, seed=args.seed, classes=k) == data.UNLABELLED
    sup = torch.nonzero(~unsup).flatten()  # args.sup_num // k of each class, chosen by a seeded shuffle
    x_test = data.binarize(x_test, torch.Generator().manual_seed(args.seed + 1))
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    x_sup, y_sup, x_unsup = x_train[sup.to(device)], y_train[sup.to(device)], x_train[unsup.to(device)]
    binarizer = torch.Generator(device=device).manual_seed(args.seed)

    # M2: y ~ Cat(uniform), z ~ N(0, I), x ~ p(x | z, y); q(y | x) a classifier, q(z | x, y)
    vae = VAE(encoder=nets.MLPEncoder((1, 28, 28), hidden=(args.hidden,)),
              decoder=nets.MLPDecoder(args.z_dim + k, (1, 28, 28), hidden=(args.hidden,)),
              latent_dims=[args.z_dim], condition=k, label_site=True, enumerate=args.enum_discrete,
              hidden=args.hidden).to(device)
    optim = Adam({"lr": args.learning_rate})
    supervised = SVI(vae.model, vae.guide, optim, Trace_ELBO())
    unsupervised = SVI(vae.model, vae.guide, optim, TraceEnum_ELBO(max_plate_nesting=1))
    aux = SVI(vae.model_classify, vae.guide_classify, optim, Trace_ELBO())

    batch = args.batch_size
    per_epoch = -(-len(x_unsup) // batch)
    every = max(1, per_epoch // max(1, -(-len(x_sup) // batch)))  # labelled steps spread over the epoch
    for epoch in range(1, args.num_epochs + 1):
        order, labelled = torch.randperm(len(x_unsup), device=device), torch.randperm(len(x_sup), device=device)
        losses = [0.0, 0.0, 0.0]
        for step, i in enumerate(order.split(batch)):
            losses[0] += unsupervised.step(data.binarize(x_unsup[i], binarizer))
            if step % every == 0:
                j = labelled[(step // every * batch) % len(x_sup):][:batch]
                xl = data.binarize(x_sup[j], binarizer)
                losses[1] += supervised.step(xl, y_sup[j])
                if args.aux_loss:
                    losses[2] += aux.step(xl, y_sup[j], weight=args.aux_loss_multiplier)
        accuracy = sum(int((vae.classify(x).argmax(-1) == y).sum()) for x, y in zip(x_test.split(1000),
                                                                                y_test.split(1000)))
        print(f"[epoch {epoch:03d}]  unsupervised loss {losses[0] / len(x_unsup):.4f}  supervised loss "
              f"{losses[1] / len(x_sup):.4f}  test accuracy {accuracy / len(x_test):.4f}", flush=True)
    return vae


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-epochs", default=50, type=int, help="number of epochs to run")
    parser.add_argument("-sup", "--sup-num", default=3000, type=int, help="labelled images (balanced over classes)")
    parser.add_argument("-enum", "--enum-discrete", default="parallel", choices=["parallel", "sequential"],
                        help="how TraceEnum_ELBO sums out the unobserved label")
    parser.add_argument("--aux-loss", action="store_true", help="add alpha * log q(y | x) on the labelled images")
    parser.add_argument("-alm", "--aux-loss-multiplier", default=46.0, type=float, help="alpha of the aux loss")
    parser.add_argument("-zd", "--z-dim", default=50, type=int, help="size of the latent z")
    parser.add_argument("-hl", "--hidden", default=500, type=int, help="width of the hidden layers")
    parser.add_argument("-lr", "--learning-rate", default=0.00042, type=float, help="Adam's learning rate")
    parser.add_argument("-bs", "--batch-size", default=200, type=int, help="images per step")
    parser.add_argument("--cuda", action="store_true", default=False, help="use CUDA")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    main(parser.parse_args())
