"""MADE (Germain et al., 2015): an autoencoder whose weight masks make it autoregressive.

Each unit has a degree: input d the position of dimension d in the order (1..D), hidden units
a degree in [1, D - 1], output d the degree of its dimension. A unit sees the units of the
layer below with degree <= its own (outputs: strictly below), so output d depends on x_<d only.
``direct`` adds the paper's direct input-to-output connections (a fully visible model beside the
hidden layers).

``MADE`` is one (order, connectivity) pair: an autoregressive model like any other. Its hidden
units are sorted by degree, so in raster order every mask connects a prefix of the layer below and
the masked products skip the masked-out half (``MaskedLinear``).

``MADEEnsemble`` (``made_ensemble``; ``create("made", num_masks=M)`` builds it for M > 1) is the
paper's connectivity-agnostic training: M MADEs sharing one set of weights, one member per
minibatch (orders drawn at random when ``order_agnostic``). It is composed of its members
(``member(m)``: a ``MADE`` whose layers are masked views of the shared weights) and is the uniform
mixture of them, p(x) = mean_m p_m(x); every method answers for that mixture:

- ``log_prob``: log of the mean of the M likelihoods (logsumexp - log M), never an average of logits.
- ``log_prob_map``, ``complete``, ``purify`` and the decoders: when the members share one order
  (not ``order_agnostic``), the mixture's own conditionals in that order,
  p(x_d | x_<d) = sum_m w_m p_m(x_d | x_<d) with w_m proportional to p_m(x_<d); so the map sums to
  ``log_prob``. Members in different orders have no tractable conditionals in any one order: these
  raise ValueError (use a member, or members sharing an order).
- ``sample``: exact either way (members in different orders: each image's member drawn uniformly,
  then decoded in that member's order).

A member keeps its masks as bool tensors once built (1/4 of the float32 weights' size each), so
moving between members costs nothing; a weight masked in one member keeps training under the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
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


def connectivity(degrees: list[Tensor], outputs_per_dim: int, direct: bool) -> list[Tensor]:
    """Bool masks [out, in] of every layer (and of the direct connections) from the degrees of the
    inputs and of each hidden layer: hidden units see degrees <= their own, outputs strictly lower."""
    out_degree = degrees[0].repeat_interleave(outputs_per_dim)
    masks = [d_out.unsqueeze(1) >= d_in.unsqueeze(0) for d_in, d_out in zip(degrees, degrees[1:], strict=False)]
    masks.append(out_degree.unsqueeze(1) > degrees[-1].unsqueeze(0))
    if direct:
        masks.append(out_degree.unsqueeze(1) > degrees[0].unsqueeze(0))
    return masks


def layer_sizes(D: int, hidden: tuple[int, ...], outputs_per_dim: int) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer: D inputs, the hidden layers, ``outputs_per_dim`` per dimension."""
    sizes = [D, *hidden, D * outputs_per_dim]
    return list(zip(sizes, sizes[1:], strict=False))


@register("made")
class MADE(AutoregressiveModel):
    """MADE with ReLU hidden layers of sizes ``hidden``, one order and connectivity; Bernoulli for
    K = 2, else K-way (``num_masks`` M > 1 builds a made_ensemble)."""

    positional = False

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 2,
        hidden: Sequence[int] | int = (500,),
        order_agnostic: bool = False,
        direct: bool = False,
        seed: int = 0,
    ) -> None:
        check_sizes(hidden=hidden)
        hidden = (hidden,) if is_integer(hidden) else tuple(hidden)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        D = self.num_dims
        self.hidden = hidden
        self.outputs_per_dim = self.head.params_per_dim
        sizes = layer_sizes(D, hidden, self.outputs_per_dim)
        self.layers = nn.ModuleList(MaskedLinear(n_in, n_out, torch.ones(n_out, n_in)) for n_in, n_out in sizes)
        self.direct = MaskedLinear(D, sizes[-1][1], torch.ones(sizes[-1][1], D), bias=False) if direct else None
        input_degree, hidden_degree = draw_degrees(D, hidden, 1, order_agnostic, seed)
        self.register_buffer("input_degree", input_degree[0])
        self.register_buffer("hidden_degree", hidden_degree[0])
        self.connect()
        self._register_load_state_dict_pre_hook(_earlier_made_layout)
        # the masks are derived, not saved: rebuilt from the loaded degrees
        self.register_load_state_dict_post_hook(lambda module, keys: module.connect())

    @staticmethod
    def variant(args: dict) -> tuple[str, dict]:
        """``num_masks`` given to ``made`` (configs written when MADE held its ensemble): M > 1 is a
        ``made_ensemble``, 1 MADE itself."""
        args = dict(args)
        num_masks = args.pop("num_masks", 1)
        return ("made", args) if is_integer(num_masks) and num_masks == 1 else (
            "made_ensemble", {**args, "num_masks": num_masks})

    @classmethod
    def member_of(cls, ensemble: MADEEnsemble, m: int) -> MADE:
        """Member ``m`` of ``ensemble``: a MADE with member m's degrees whose layers are masked views
        of the ensemble's weights (trained and moved with the ensemble; saved alone, a MADE of its own)."""
        with torch.device("meta"):  # its own layers are replaced by the views below: nothing allocated
            member = cls(ensemble.image_shape, ensemble.num_levels, ensemble.hidden, direct=ensemble.direct is not None)
        member.head = ensemble.head
        member.input_degree, member.hidden_degree = ensemble.input_degree[m].clone(), ensemble.hidden_degree[m].clone()
        masks = member.masks()
        member.layers = nn.ModuleList(MaskedLinear.sharing(layer, mask) for layer, mask in zip(ensemble.layers, masks,
                                                                                                strict=False))
        if ensemble.direct is not None:
            member.direct = MaskedLinear.sharing(ensemble.direct, masks[-1])
        return member.train(ensemble.training)

    def masks(self) -> list[Tensor]:
        """The bool masks of the layers (and of the direct connections) this MADE's degrees give."""
        degrees = [self.input_degree, *self.hidden_degree.split(list(self.hidden))]
        return connectivity(degrees, self.outputs_per_dim, self.direct is not None)

    def connect(self) -> None:
        """Set every layer's mask from the degrees (at construction and after loading them)."""
        if self.input_degree.is_meta:
            return
        for layer, mask in zip([*self.layers, *([self.direct] if self.direct is not None else [])], self.masks(),
                               strict=True):
            layer.set_mask(mask)

    def decoding_order(self) -> list[tuple[int, int, int]]:
        C, H, W = self.image_shape
        order = self.input_degree.argsort().tolist()  # raster indices in the order
        return [(j % C, j // C // W, j // C % W) for j in order]

    def params_from_first(self, first: Tensor, inputs: Tensor | None, dim: int | None = None) -> Tensor:
        """Output parameters [B, D, p] (or [B, 1, p] of raster dimension ``dim`` alone) from the
        first layer's pre-activation [B, H1] and the inputs [B, D] (None without ``direct``)."""
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

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        inputs = self.raster(self.unit(x))
        return self.unraster(self.params_from_first(self.layers[0](inputs), inputs))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return MADEDecoder(self, x, labels)


def _earlier_made_layout(state: dict, prefix: str, *_) -> None:
    """Files written when MADE held its ensemble: degrees [1, D] and [1, H], and a mask index."""
    state.pop(prefix + "mask_index", None)
    for key in ("input_degree", "hidden_degree"):
        degrees = state.get(prefix + key)
        if degrees is not None and degrees.dim() == 2 and len(degrees) == 1:
            state[prefix + key] = degrees[0]


@register("made_ensemble")
class MADEEnsemble(AutoregressiveModel):
    """The uniform mixture of ``num_masks`` MADEs (orders and connectivities) sharing one set of
    weights, trained one member per minibatch (Germain et al.'s connectivity-agnostic training)."""

    positional = False

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 2,
        hidden: Sequence[int] | int = (500,),
        num_masks: int = 2,
        order_agnostic: bool = False,
        direct: bool = False,
        seed: int = 0,
    ) -> None:
        check_sizes(hidden=hidden, num_masks=num_masks)
        hidden = (hidden,) if is_integer(hidden) else tuple(hidden)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        D = self.num_dims
        self.hidden = hidden
        self.num_masks = num_masks
        sizes = layer_sizes(D, hidden, self.head.params_per_dim)
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in sizes)  # the shared weights
        self.direct = nn.Linear(D, sizes[-1][1], bias=False) if direct else None
        input_degree, hidden_degree = draw_degrees(D, hidden, num_masks, order_agnostic, seed)
        self.register_buffer("input_degree", input_degree)
        self.register_buffer("hidden_degree", hidden_degree)
        self.register_buffer("next_member", torch.zeros((), dtype=torch.long))  # trained next (saved: exact resume)
        self._members: dict[int, MADE] = {}
        self._members_key: tuple | None = None
        self._register_load_state_dict_pre_hook(_earlier_ensemble_layout)

    def member(self, m: int) -> MADE:
        """Member ``m`` (a ``MADE`` on views of the shared weights), built on first use and kept until
        the degrees, device, dtype or weights' identity change."""
        if not (is_integer(m) and 0 <= m < self.num_masks):
            raise ValueError(f"member must be an integer in [0, {self.num_masks}), got {m!r}")
        key = (self.input_degree._version, self.hidden_degree._version, self.input_degree.device, self.dtype,
               *(id(p) for p in self.parameters()))
        if self._members_key != key:
            self._members, self._members_key = {}, key
        if m not in self._members:
            self._members[m] = MADE.member_of(self, m)
        return self._members[m].train(self.training)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """In training, the parameters of the next member in turn (one member per minibatch, cycling
        through them); the mixture itself has no per-dimension parameters, so outside training
        this raises ValueError: score it with ``log_prob`` / ``log_prob_map``."""
        if not self.training:
            raise ValueError("a MADE ensemble's forward trains one member per call; score the mixture with "
                             "log_prob or log_prob_map, or use member(m)")
        m = int(self.next_member)
        self.next_member.fill_((m + 1) % self.num_masks)
        return self.member(m)(x, labels)

    @property
    def shared_order(self) -> bool:
        """Whether every member decodes in the same order (then the mixture has conditionals)."""
        return bool((self.input_degree == self.input_degree[:1]).all())

    @property
    def has_conditionals(self) -> bool:
        return self.shared_order

    def _need_shared_order(self, what: str) -> None:
        if not self.shared_order:
            raise ValueError(f"{what}: this MADE is a mixture of {self.num_masks} masks in different orders "
                             "(order_agnostic), whose conditionals in any one order are intractable; its log_prob "
                             "and sample are exact. Use one member (member(m)), or masks sharing one order, for this")

    def decoding_order(self) -> list[tuple[int, int, int]]:
        return self.member(0).decoding_order()

    def log_prob_map(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x_d | x_<d) per dimension [B, C, H, W], nats: the mixture's own conditionals in the
        members' shared order (it sums to ``log_prob``)."""
        self._need_shared_order("log_prob_map")
        x, _ = self.check_input(x, labels)
        per_member = torch.stack([self.raster(self.member(m).log_prob_map(x)).double() for m in range(self.num_masks)])
        order = self.input_degree[0].argsort()
        prefix = per_member[:, :, order].cumsum(2)  # log p_m(x_<=d), [M, B, D] in the order
        joint = prefix.logsumexp(0) - math.log(self.num_masks)  # log p(x_<=d) under the mixture
        conditional = torch.diff(joint, dim=1, prepend=joint.new_zeros(len(x), 1))
        raster = torch.empty_like(conditional)
        raster[:, order] = conditional
        C, H, W = self.image_shape
        return raster.view(len(x), H, W, C).permute(0, 3, 1, 2).to(self.dtype)

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact log p(x), nats [B]: log of the mean of the M members' likelihoods (logsumexp - log M),
        never an average of logits."""
        x, _ = self.check_input(x, labels)
        per_member = torch.stack([self.member(m).log_prob(x).double() for m in range(self.num_masks)])
        return (per_member.logsumexp(0) - math.log(self.num_masks)).to(self.dtype)

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        self._need_shared_order("decoding")
        return MixtureDecoder(self, x, [self.member(m).decoder(x) for m in range(self.num_masks)])

    def naive_decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        self._need_shared_order("decoding")
        return MixtureDecoder(self, x, [self.member(m).naive_decoder(x) for m in range(self.num_masks)])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               labels: Tensor | None = None, **options) -> Tensor:
        """As ``AutoregressiveModel.sample``; members in different orders: each image's member
        drawn uniformly (from ``generator``), the images of member m decoded in m's order."""
        if self.shared_order or not is_integer(n) or n < 1:
            return super().sample(n, generator, temperature, labels, **options)
        device = generator.device if generator is not None else torch.device("cpu")
        members = torch.randint(self.num_masks, (n,), generator=generator, device=device).to(self.device)
        out = torch.zeros(n, *self.image_shape, dtype=torch.long, device=self.device)
        for m in members.unique().tolist():
            rows = (members == m).nonzero().squeeze(1)
            out[rows] = self.member(m).sample(len(rows), generator, temperature, **options)
        return out


def _earlier_ensemble_layout(state: dict, prefix: str, *_) -> None:
    """Files written when MADE held its ensemble: the mask last trained, where the member next
    trained is now kept."""
    if prefix + "mask_index" in state:
        state[prefix + "next_member"] = state.pop(prefix + "mask_index")


class MADEDecoder(Decoder):
    """Incremental first layer: its pre-activation gains one input column per final dimension; the layers
    above are recomputed (O(H1 * H2) per step), the output only for the current dimension."""

    def __init__(self, model: MADE, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
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
        inputs = model.raster(model.unit(self.x)) if model.direct is not None else None
        return model.head.dim_conditional(model.params_from_first(self.a, inputs, self.raster_index(c, h, w))[:, 0])


class MixtureDecoder(Decoder):
    """The uniform mixture of ``members`` decoding in one order: p(x_d | x_<d) = sum_m w_m
    p_m(x_d | x_<d), the weights w_m proportional to p_m(x_<d), each member's log-likelihood of
    the dimensions already final (kept in float64, [M, B])."""

    def __init__(self, model: MADEEnsemble, x: Tensor, members: list[Decoder]) -> None:
        super().__init__(model, x)
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
