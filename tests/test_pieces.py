"""A user's own pieces (transitions, likelihoods, posterior heads, decoders) that hand Pyro the wrong
thing are caught at the first model/guide call, in one line naming the piece and the shape needed."""

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vae import VAE, InputError, likelihoods
from pyro_vae.pieces import SiteShapes, check_distribution

D_X, DIMS = 12, [2, 3]


class Transition(nn.Module):
    """p(z1 | z0) as a user might write it, with a chosen mistake."""

    def __init__(self, mistake=None):
        super().__init__()
        self.net, self.mistake = nn.Linear(DIMS[0], DIMS[1]), mistake

    def forward(self, z):
        loc = self.net(z)
        if self.mistake == "no to_event":
            return dist.Normal(loc, 1.0)
        if self.mistake == "tensor":
            return loc
        if self.mistake == "torch":
            return torch.distributions.Independent(torch.distributions.Normal(loc, 1.0), 1)
        if self.mistake == "wide":
            return dist.Normal(torch.cat([loc, loc], -1), 1.0).to_event(1)
        return dist.Normal(loc, 1.0).to_event(1)


class Head(nn.Module):
    def __init__(self, features, dim):
        super().__init__()
        self.net = nn.Linear(features, dim)

    def forward(self, h):
        return dist.Normal(self.net(h), 1.0)  # forgot .to_event(1)


def make(mistake=None, guide="top-down", decoder_out=D_X, **kwargs):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D_X, 16), nn.Softplus())
    decoder = nn.Sequential(nn.Linear(DIMS[-1], decoder_out))
    return VAE(encoder, decoder, list(DIMS), x_shape=(D_X,), guide=guide, transitions=[Transition(mistake)], **kwargs)


X = (torch.rand(6, D_X, generator=torch.Generator().manual_seed(0)) < 0.5).float()


@pytest.mark.parametrize("guide", ["top-down", "bottom-up"])
@pytest.mark.parametrize("mistake, message", [
    ("no to_event", r"transitions\[0\], p\(z1 \| z0\), returned a distribution with event shape \(\) and batch "
                    r"shape \(6, 3\), but its site needs event shape \(3,\) .*; add \.to_event\(1\)"),
    ("tensor", r"transitions\[0\], p\(z1 \| z0\), must return a Pyro distribution, got Tensor"),
    ("torch", r"must return a Pyro distribution, got a torch\.distributions object, not a Pyro one"),
    ("wide", r"event shape \(6,\) and batch shape \(6,\), but its site needs event shape \(3,\) .*check the network"),
])
def test_a_bad_transition_is_named_at_the_first_call(mistake, message, guide):
    vae = make(mistake, guide)
    with pytest.raises(InputError, match=message):
        Trace_ELBO().loss(vae.model, vae.guide, X)


def test_a_decoder_of_the_wrong_width_is_named_through_the_likelihood():
    vae = make(decoder_out=D_X - 2)
    with pytest.raises(InputError, match=r"the likelihood Bernoulli, on the decoder's output, returned a distribution "
                                         r"with event shape \(10,\) .* needs event shape \(12,\)"):
        Trace_ELBO().loss(vae.model, vae.guide, X)


def test_a_users_likelihood_callable_of_the_wrong_shape_is_named():
    vae = make(likelihood=likelihoods.UserLikelihood(lambda out: dist.Bernoulli(logits=out[..., :4]).to_event(1)))
    with pytest.raises(InputError, match=r"the likelihood UserLikelihood.*event shape \(4,\).*needs event shape \(12,\)"):
        Trace_ELBO().loss(vae.model, vae.guide, X)


@pytest.mark.parametrize("guide, site", [("top-down", "ladder_heads\\[0\\], q\\(z0 \\| x\\)"),
                                         ("bottom-up", "the posterior head Head, q\\(z1 \\| x\\)")])  # drawn first
def test_a_users_posterior_family_without_to_event_is_named(guide, site):
    vae = make(guide=guide, posterior=Head)
    with pytest.raises(InputError, match=site + r", returned a distribution with event shape \(\).*to_event\(1\)"):
        Trace_ELBO().loss(vae.model, vae.guide, X)


def test_good_pieces_are_checked_once_and_then_left_alone(monkeypatch):
    import pyro_vae.vae

    vae, made = make(), []
    monkeypatch.setattr(pyro_vae.vae, "SiteShapes", lambda *a: made.append(a) or SiteShapes(*a))
    assert Trace_ELBO().loss(vae.model, vae.guide, X) > 0
    assert len(made) == 2 and vae._pieces_checked == {"model", "guide"}  # the guide's first call, the model's
    Trace_ELBO().loss(vae.model, vae.guide, X)
    assert len(made) == 2  # nothing checked at later calls: no cost in the training loop


def test_messages_stay_one_line_inside_pyros_traces():
    vae = make("no to_event")
    with pytest.raises(InputError) as caught:
        Trace_ELBO().loss(vae.model, vae.guide, X)
    assert "\n" not in str(caught.value)  # Pyro appends its trace's shapes to errors it re-raises


def test_check_distribution_accepts_what_a_plate_broadcasts():
    d = dist.Normal(torch.zeros(3), 1.0).to_event(1)  # no batch dims: broadcast by the plate
    assert check_distribution(d, "p", (3,), 5) is d
    assert check_distribution(dist.Normal(torch.zeros(1, 3), 1.0).to_event(1), "p", (3,), 5)
    with pytest.raises(InputError, match="batch shape \\(\\)"):
        check_distribution(dist.Normal(torch.zeros(2, 3), 1.0).to_event(1), "the prior", (3,))


def test_a_transition_with_an_extra_batch_dim_is_named():
    class Extra(Transition):
        def forward(self, z):
            return dist.Normal(self.net(z).unsqueeze(-2), 1.0).to_event(1)  # (B, 1, D): broadcasts to (B, B, D)

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D_X, 16), nn.Softplus())
    for guide in ("bottom-up", "top-down"):
        vae = VAE(encoder, nn.Sequential(nn.Linear(DIMS[-1], D_X)), list(DIMS), x_shape=(D_X,), guide=guide,
                  transitions=[Extra()])
        with pytest.raises(InputError, match=r"transitions\[0\].*batch shape \(6, 1\), but its site needs"):
            Trace_ELBO().loss(vae.model, vae.guide, X)


def test_a_top_down_head_of_the_wrong_width_is_named_before_the_merge():
    class Wide(nn.Module):
        def __init__(self, features, dim):
            super().__init__()
            self.net = nn.Linear(features, dim + 1)

        def forward(self, h):
            return dist.Normal(self.net(h), 1.0).to_event(1)

    vae = make(posterior=Wide)
    with pytest.raises(InputError, match=r"ladder_heads\[0\], q\(z0 \| x\), returned a distribution with event "
                                         r"shape \(3,\) .* needs event shape \(2,\)"):  # the first head drawn
        Trace_ELBO().loss(vae.model, vae.guide, X)


def test_a_likelihood_that_flattens_is_named_not_a_pyro_traceback():
    x = torch.rand(6, 1, 4, 4)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Softplus())
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Unflatten(-1, (1, 4, 4)))
    vae = VAE(encoder, decoder, [2], x_shape=(1, 4, 4),
              likelihood=likelihoods.UserLikelihood(lambda out: dist.Bernoulli(logits=out.flatten(-3))))
    with pytest.raises(InputError, match=r"the likelihood UserLikelihood.*event shape \(\) and batch shape \(6, 16\).*"
                                         r"needs event shape \(1, 4, 4\)"):
        Trace_ELBO().loss(vae.model, vae.guide, x)


def test_the_dry_run_leaves_every_submodule_in_its_own_mode():
    backbone = nn.Sequential(nn.Linear(D_X, 8), nn.Dropout(0.5)).eval()  # a frozen, pretrained part
    encoder = nn.Sequential(backbone, nn.Linear(8, 8), nn.Softplus())
    before = [m.training for m in encoder.modules()]
    VAE(encoder, nn.Linear(3, D_X), [3], x_shape=(D_X,))
    assert [m.training for m in encoder.modules()] == before and not backbone.training
