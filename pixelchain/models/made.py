"""MADE (Germain et al., 2015): an autoencoder whose weight masks make it autoregressive.

Each unit has a degree: input d the position of dimension d in the order (1..D), hidden units
a degree in [1, D - 1], output d the degree of its dimension. A unit sees the units of the
layer below with degree <= its own (outputs: strictly below), so output d depends on x_<d only.

``num_masks`` M > 1 trains an ensemble of M (order, connectivity) pairs, one per minibatch
(order-agnostic when ``order_agnostic``). The model is the uniform mixture of the M members,
p(x) = mean_m p_m(x), and every method answers for that mixture:

- ``log_prob``: log of the mean of the M likelihoods (logsumexp - log M), never an average of logits.
- ``log_prob_map``, ``complete``, ``purify`` and the decoders: when the members share one order
  (not ``order_agnostic``), the mixture's own conditionals in that order,
  p(x_d | x_<d) = sum_m w_m p_m(x_d | x_<d) with w_m proportional to p_m(x_<d); so the map sums to
  ``log_prob``. Members in different orders have no tractable conditionals in any one order: these
  raise ValueError (train with one mask, or members sharing an order, to use them).
- ``sample``: exact either way (members in different orders: each image's member drawn uniformly,
  then decoded in that member's order).

Each mask is built once, when first used, and kept (as bytes: about M / 4 times the size of the
float32 weights), so cycling them only copies them into the layers; evaluation loops over the masks
outside the batches (``log_prob_batches``). Masks multiply the weights in the forward pass, so a
weight masked in one mask keeps training under the others. ``direct`` adds the paper's direct
input-to-output connections (a fully visible model beside the hidden layers).

With one mask the hidden units are sorted by degree, so in raster order every mask connects a
prefix of the layer below and the masked products skip the masked-out half (``MaskedLinear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..decode import Decoder, NaiveDecoder
from ..heads import default_head
from ..layers import MaskedLinear
from . import register
from .base import AutoregressiveModel, check_sizes, is_integer


def draw_degrees(D: int, hidden: tuple[int, ...], num_masks: int, order_agnostic: bool,
                 seed: int) -> tuple[Tensor, Tensor]:
    """Degrees of every mask, drawn once from ``seed`` and saved with the weights: input_degree
    [M, D] (1 + the position of raster dimension j in mask m's order) and hidden_degree [M, sum(hidden)],
    hidden unit degrees ~ U{min degree of the layer below .. D - 1}; sorted when there is one mask
    (units are interchangeable; sorted, each unit sees a prefix of the layer below). On the meta
    device (a model being sized before it is built) only their shapes."""
    if torch.empty(0).device.type == "meta":
        return torch.empty(num_masks, D, dtype=torch.long), torch.empty(num_masks, sum(hidden), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    orders, hidden_degrees = [], []
    for _ in range(num_masks):
        orders.append(torch.randperm(D, generator=g) if order_agnostic else torch.arange(D))
        low, layers = 1, []
        for size in hidden:
            degrees = torch.randint(low, max(D, low + 1), (size,), generator=g)
            layers.append(degrees.sort().values if num_masks == 1 else degrees)
            low = int(layers[-1].min())
        hidden_degrees.append(torch.cat(layers))
    return torch.stack([order.argsort() + 1 for order in orders]), torch.stack(hidden_degrees)


@register("made")
class MADE(AutoregressiveModel):
    """MADE with ReLU hidden layers of sizes ``hidden``; Bernoulli for K = 2, else K-way."""

    positional = False

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 2,
        hidden: Sequence[int] | int = (500,),
        num_masks: int = 1,
        order_agnostic: bool = False,
        direct: bool = False,
        seed: int = 0,
    ) -> None:
        check_sizes(hidden=hidden, num_masks=num_masks)
        hidden = (hidden,) if is_integer(hidden) else tuple(hidden)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        D = self.num_dims
        self.outputs_per_dim = self.head.params_per_dim
        sizes = [D, *hidden, D * self.outputs_per_dim]
        self.layers = nn.ModuleList(
            MaskedLinear(n_in, n_out, torch.ones(n_out, n_in)) for n_in, n_out in zip(sizes, sizes[1:], strict=False)
        )
        self.direct = MaskedLinear(D, sizes[-1], torch.ones(sizes[-1], D), bias=False) if direct else None
        input_degree, hidden_degree = draw_degrees(D, hidden, num_masks, order_agnostic, seed)
        self.register_buffer("input_degree", input_degree)
        self.register_buffer("hidden_degree", hidden_degree)
        self.hidden = tuple(hidden)
        self.num_masks = num_masks
        self.register_buffer("mask_index", torch.zeros((), dtype=torch.long))
        self.built: dict[int, list[Tensor]] = {}  # mask m -> its layers' masks (and direct's)
        self.built_from: tuple | None = None  # the degrees they were built from
        self.member: int | None = None  # decode this member alone (sampling members in different orders)
        self.use_mask(0)
        # the masks are derived, not saved: rebuild them from the loaded degrees and mask index
        self.register_load_state_dict_post_hook(lambda module, keys: module.use_mask(int(module.mask_index)))

    def masks(self, m: int) -> list[Tensor]:
        """Mask ``m``'s bool masks of the layers (and of the direct connections), built on first use
        and kept until the degrees change (loading weights) or move to another device."""
        key = (self.input_degree._version, self.hidden_degree._version, self.input_degree.device)
        if self.built_from != key:
            self.built, self.built_from = {}, key
        if m not in self.built:
            degrees = [self.input_degree[m], *self.hidden_degree[m].split(list(self.hidden))]
            out_degree = self.input_degree[m].repeat_interleave(self.outputs_per_dim)
            # hidden units see degrees <= their own, outputs strictly lower ones
            masks = [d_out.unsqueeze(1) >= d_in.unsqueeze(0) for d_in, d_out in zip(degrees, degrees[1:], strict=False)]
            masks.append(out_degree.unsqueeze(1) > degrees[-1].unsqueeze(0))
            if self.direct is not None:
                masks.append(out_degree.unsqueeze(1) > self.input_degree[m].unsqueeze(0))
            self.built[m] = masks
        return self.built[m]

    def use_mask(self, m: int) -> None:
        """Set every layer's mask to mask ``m`` of the ensemble."""
        layers = [*self.layers, *([self.direct] if self.direct is not None else [])]
        for layer, mask in zip(layers, self.masks(m), strict=True):
            layer.set_mask(mask)
        self.mask_index.fill_(m)

    def decoding_order(self) -> list[tuple[int, int, int]]:
        C, H, W = self.image_shape
        order = self.input_degree[self.member or 0].argsort().tolist()  # raster indices in the order
        return [(j % C, j // C // W, j // C % W) for j in order]

    def params_from_first(self, first: Tensor, inputs: Tensor, dim: int | None = None) -> Tensor:
        """Output parameters [B, D, p] (or [B, 1, p] of raster dimension ``dim`` alone) from the
        first layer's pre-activation [B, H1] and the inputs [B, D], under the current mask."""
        h = torch.relu(first)
        for layer in self.layers[1:-1]:
            h = torch.relu(layer(h))
        last, direct, p = self.layers[-1], self.direct, self.outputs_per_dim
        if dim is None:
            out = last(h) + (direct(inputs) if direct is not None else 0)
        else:
            rows = slice(dim * p, (dim + 1) * p)
            out = F.linear(h, last.masked_weight(rows), last.bias[rows])
            if direct is not None:
                out = out + F.linear(inputs, direct.masked_weight(rows))
        return out.view(len(h), -1, p)

    def params(self, x: Tensor) -> Tensor:
        """Head parameters [B, P, H, W] under the current mask."""
        inputs = self.raster(self.unit(x))
        return self.unraster(self.params_from_first(self.layers[0](inputs), inputs))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """One member's parameters: in training each call moves to the next mask of the ensemble; in
        eval, mask 0 (or the member being decoded)."""
        if self.training and self.num_masks > 1:
            self.use_mask((int(self.mask_index) + 1) % self.num_masks)
        elif not self.training and int(self.mask_index) != (self.member or 0):
            self.use_mask(self.member or 0)
        return self.params(x)

    @property
    def shared_order(self) -> bool:
        """Whether every member decodes in the same order (then the mixture has conditionals)."""
        return bool((self.input_degree == self.input_degree[:1]).all())

    @property
    def has_conditionals(self) -> bool:
        return self.num_masks == 1 or self.member is not None or self.shared_order

    def _need_shared_order(self, what: str) -> None:
        if not self.has_conditionals:
            raise ValueError(f"{what}: this MADE is a mixture of {self.num_masks} masks in different orders "
                             "(order_agnostic), whose conditionals in any one order are intractable; its log_prob "
                             "and sample are exact. Use num_masks=1, or masks sharing one order, for this")

    def log_prob_map(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x_d | x_<d) per dimension [B, C, H, W], nats; with M > 1 masks the mixture's own
        conditionals in the members' shared order (it sums to ``log_prob``)."""
        if self.num_masks == 1:
            return super().log_prob_map(x, labels)
        self._need_shared_order("log_prob_map")
        x, _ = self.check_input(x, labels)
        current, per_member = int(self.mask_index), []
        for m in range(self.num_masks):
            self.use_mask(m)
            per_member.append(self.raster(self.head.log_prob(self.params(x), x)).double())
        self.use_mask(current)
        order = self.input_degree[0].argsort()
        prefix = torch.stack(per_member)[:, :, order].cumsum(2)  # log p_m(x_<=d), [M, B, D] in the order
        joint = prefix.logsumexp(0) - math.log(self.num_masks)  # log p(x_<=d) under the mixture
        conditional = torch.diff(joint, dim=1, prepend=joint.new_zeros(len(x), 1))
        raster = torch.empty_like(conditional)
        raster[:, order] = conditional
        C, H, W = self.image_shape
        return raster.view(len(x), H, W, C).permute(0, 3, 1, 2).to(self.dtype)

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact log p(x), nats [B]; with M > 1 masks the mixture: log of the mean of the M
        likelihoods (logsumexp - log M), never an average of logits."""
        if self.num_masks == 1:
            return super().log_prob(x, labels)
        return self.log_prob_batches([self.check_input(x, labels)[0]]).to(self.dtype)

    def log_prob_batches(self, batches: list[Tensor], progress: bool = False) -> Tensor:
        """The ensemble's log p(x) (float64) of every image of ``batches``, one mask at a time: each
        mask set once for all the batches."""
        if self.num_masks == 1:
            return super().log_prob_batches(batches, progress)
        current, total = int(self.mask_index), None
        for m in tqdm(range(self.num_masks), desc="evaluating masks", disable=not progress, leave=False):
            self.use_mask(m)
            per_image = torch.cat([self.head.log_prob(self.params(x), x).flatten(1).sum(1).double()
                                   for x in (x.to(self.device) for x in batches)])
            total = per_image if total is None else torch.logaddexp(total, per_image)
        self.use_mask(current)
        return total - math.log(self.num_masks)

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        if self.num_masks == 1 or self.member is not None:
            return MADEDecoder(self, x, labels, self.member or 0)
        self._need_shared_order("decoding")
        return MixtureDecoder(self, x, labels, [MADEDecoder(self, x, labels, m) for m in range(self.num_masks)])

    def naive_decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        if self.num_masks == 1 or self.member is not None:
            return NaiveDecoder(self, x, labels)
        self._need_shared_order("decoding")
        return MixtureDecoder(self, x, labels, [MemberDecoder(self, x, labels, m) for m in range(self.num_masks)])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               labels: Tensor | None = None, **options) -> Tensor:
        """As ``AutoregressiveModel.sample``; members in different orders: each image's member
        drawn uniformly (from ``generator``), the images of member m decoded in m's order."""
        if self.num_masks == 1 or self.shared_order or not is_integer(n) or n < 1:
            return super().sample(n, generator, temperature, labels, **options)
        device = generator.device if generator is not None else torch.device("cpu")
        members = torch.randint(self.num_masks, (n,), generator=generator, device=device).to(self.device)
        out = torch.zeros(n, *self.image_shape, dtype=torch.long, device=self.device)
        try:
            for m in members.unique().tolist():
                rows = (members == m).nonzero().squeeze(1)
                self.member = m
                out[rows] = super().sample(len(rows), generator, temperature,
                                           None if labels is None else labels[rows], **options)
        finally:
            self.member = None
        return out


class MADEDecoder(Decoder):
    """Incremental first layer: its pre-activation gains one input column per final dimension; the layers
    above are recomputed (O(H1 * H2) per step), the output only for the current dimension."""

    def __init__(self, model: MADE, x: Tensor, labels: Tensor | None = None, mask: int = 0) -> None:
        super().__init__(model, x, labels)
        self.mask = mask
        model.use_mask(mask)
        first = model.layers[0]
        self.weight = first.masked_weight()
        self.a = first.bias.expand(len(x), -1).clone()

    def raster_index(self, c: int, h: int, w: int) -> int:
        C, _, W = self.model.image_shape
        return (h * W + w) * C + c

    def final(self, step: int, c: int, h: int, w: int) -> None:
        value = self.model.unit(self.x[:, c, h, w])
        self.a += value.unsqueeze(1) * self.weight[:, self.raster_index(c, h, w)]

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        model = self.model
        if model.num_masks > 1:
            model.use_mask(self.mask)
        inputs = model.raster(model.unit(self.x)) if model.direct is not None else None
        return model.head.dim_conditional(model.params_from_first(self.a, inputs, self.raster_index(c, h, w))[:, 0])


class MemberDecoder(Decoder):
    """The reference decoder of member ``mask``: its full forward pass per step."""

    def __init__(self, model: MADE, x: Tensor, labels: Tensor | None = None, mask: int = 0) -> None:
        super().__init__(model, x, labels)
        self.mask = mask

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        self.model.use_mask(self.mask)
        return self.model.head.conditional(self.model.params(self.x)[:, :, h, w], self.x[:, :, h, w], c)


class MixtureDecoder(Decoder):
    """The uniform mixture of ``members`` decoding in one order: p(x_d | x_<d) = sum_m w_m
    p_m(x_d | x_<d), the weights w_m proportional to p_m(x_<d), each member's log-likelihood of
    the dimensions already final (kept in float64, [M, B])."""

    def __init__(self, model: MADE, x: Tensor, labels: Tensor | None, members: list[Decoder]) -> None:
        super().__init__(model, x, labels)
        self.members = members
        self.prefix = torch.zeros(len(members), len(x), dtype=torch.float64, device=x.device)
        self.last: Tensor | None = None

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        self.last = torch.stack([m.conditional(step, c, h, w) for m in self.members]).double()  # [M, B, K]
        mixed = (self.prefix.log_softmax(0).unsqueeze(2) + self.last).logsumexp(0)
        return mixed.to(self.model.dtype)

    def final(self, step: int, c: int, h: int, w: int) -> None:
        value = self.x[:, c, h, w].view(1, -1, 1).expand(len(self.members), -1, 1)
        self.prefix += self.last.gather(2, value).squeeze(2)
        for member in self.members:
            member.final(step, c, h, w)
