"""Masked generative prior over a tokenizer's code grid (MaskGIT, Chang et al., 2022).

A bidirectional transformer sees the whole grid with some cells replaced by a [MASK] token and
predicts the code of every cell; training masks a cosine-scheduled share of the cells and
scores the masked ones. Sampling starts from an all-masked grid and fixes cells in parallel
over a few steps, the most confident first, so a grid costs `steps` forward passes instead of
one per cell. The class embedding is added at every position; a learned null class stands in
for it under class dropout, which is what classifier-free guidance (CFG) contrasts against.

For RL, a sample's log-probability is the sum over steps of the log-probabilities of the codes
fixed at that step, under the guided, tempered distribution they were drawn from; which cells
get fixed (the confidence ranking) is treated as part of the environment, not of the policy.

Kind `maskgit` (`KIND`): trained by masked-cell cross-entropy, validated by its order-agnostic
NLL bound in bits per code, sampled in `prior.decoding_steps` parallel steps, fine-tuned by RL
with a whole decoding trajectory as one action.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe.models.priors.base import RNG, Metrics, Settings, Tensor
from genpipe.models.priors.transformer import (
    CodeTransformer,
    CodeTransformerKind,
    check_sampling,
    filter_logits,
    sample_categorical,
    token_sampling,
)
from genpipe.rl import Rollout

if TYPE_CHECKING:
    from genpipe.config import Finetune, Prior
    from genpipe.generator import Generator


def masking_schedule(num_codes: int, steps: int) -> list[int]:
    """Cells still masked after each of `steps` decoding steps: floor(L cos(pi/2 t/T)), at least
    one fixed per step and none masked after the last."""
    if not 1 <= steps <= num_codes:
        raise ValueError(f"steps must be in [1, {num_codes}] (the grid's cells), got {steps}")
    left, masked = [], num_codes
    for t in range(1, steps + 1):
        target = math.floor(num_codes * math.cos(math.pi / 2 * t / steps))
        # leave at least one cell for each remaining step, fix at least one now
        masked = min(max(target, steps - t), masked - 1)
        left.append(masked)
    return left


@dataclass
class Trajectory:
    """One parallel-decoding run for a batch of B grids of L cells over T steps.

    inputs[t]: (B, L) the grid the model saw at step t (mask token where still unknown);
    fixed[t]: (B, L) bool, the cells fixed at step t; codes: (B, L) the final grid;
    logp: (B, T) log-probabilities of the codes fixed at each step, as sampled.
    """

    inputs: torch.Tensor
    fixed: torch.Tensor
    codes: torch.Tensor
    logp: torch.Tensor


class MaskGITPrior(CodeTransformer):
    """Class-conditional masked prior over an (h, w) grid of K codes; input code K is [MASK]."""

    causal = False
    extra_tokens = 1  # input code K is [MASK], never a prediction
    default_pos = "learned"

    @property
    def mask_token(self) -> int:
        return self.vocab_size

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
        cells: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Partly masked grids (B, L) or (B, h, w), codes in [0, K] with K = [MASK], and labels
        (B,) -> logits (B, L, K) for every cell, or (B, n, K) for the cells (B, n) indexed by
        `cells` (sampling scores only the masked ones). `drop_mask` (B,) bool: null class."""
        codes = self._flat(codes)
        x = self.tok_emb(codes) + self.class_emb(self.with_null(labels, drop_mask))[:, None]
        x = self._hidden(x)
        if cells is not None:
            x = x.gather(1, cells[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.ln_f(x))

    def random_mask(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training masks (B, L) bool: ceil(L cos(pi/2 u)) random cells per row, u ~ U(0, 1),
        at least one."""
        g_dev = generator.device
        u = torch.rand(batch, 1, generator=generator, device=g_dev)
        count = (self.seq_len * torch.cos(math.pi / 2 * u)).ceil().clamp(1, self.seq_len)
        order = torch.rand(batch, self.seq_len, generator=generator, device=g_dev).argsort(1)
        ranks = order.argsort(1)  # a uniformly random permutation of the cells per row
        return ranks < count

    def _masked_ce(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        drop: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross-entropy (nats) per cell (B, L) of the true codes, zero on unmasked cells."""
        inputs = codes.masked_fill(mask, self.mask_token)
        logits = self(inputs, labels, drop).float()
        ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")
        return ce * mask

    def loss(
        self, codes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Mean cross-entropy (nats) over the masked cells, masks and (when training) class
        dropout drawn from `generator`."""
        codes = self._flat(codes)
        mask = self.random_mask(codes.shape[0], generator).to(codes.device)
        drop = self.drop_labels(labels, generator) if self.training else None
        return self._masked_ce(codes, labels, mask, drop).sum() / mask.sum()

    @torch.no_grad()
    def nll_bits_per_code(
        self, codes: torch.Tensor, labels: torch.Tensor, seed: int = 0, batch_size: int = 512
    ) -> float:
        """Upper bound on the NLL in bits per code, no class dropout: the model read as an
        order-agnostic autoregressive model (Hoogeboom et al., 2022), E_k E_mask[mean CE of the
        k masked cells] with k uniform in 1..L. A bound on a different model than parallel
        decoding samples, comparable with AR's NLL.

        Estimated in one pass over the rows, like AR's NLL, not one per k (49 passes over
        MNIST's 9,000 validation grids took the stage most of an hour on CPU): the rows, in a
        seeded random order, take k = 1..L in turn (repeated until every k has a row), each
        with one seeded random mask of k cells; the mean CE of every k's rows is averaged
        over k. In batches of rows, as AR's: a whole split at once holds (N, L, 4 * dim)."""
        codes = self._flat(codes)
        reps = -(-self.seq_len // codes.shape[0])  # so that every k gets a row
        codes, labels = codes.repeat(reps, 1), labels.repeat(reps)
        rows = codes.shape[0]
        g = torch.Generator().manual_seed(seed)
        k = torch.empty(rows, dtype=torch.long)
        k[torch.randperm(rows, generator=g)] = torch.arange(rows) % self.seq_len + 1
        ranks = torch.rand(rows, self.seq_len, generator=g).argsort(1).argsort(1)
        mask = (ranks < k[:, None]).to(codes.device)
        ce = [
            self._masked_ce(codes[i:j], labels[i:j], mask[i:j], None).sum(1).cpu()
            for i, j in ((i, i + batch_size) for i in range(0, rows, batch_size))
        ]
        per_row = torch.cat(ce) / k  # mean CE of each row's k masked cells
        per_k = torch.zeros(self.seq_len, dtype=per_row.dtype).index_add_(0, k - 1, per_row)
        per_k /= torch.bincount(k - 1, minlength=self.seq_len)
        return per_k.mean().item() / math.log(2)

    def guided_logits(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        cfg_scale: float,
        cells: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float logits (B, L or n, K) with CFG: uncond + s * (cond - uncond), both halves in
        one batch of 2B; at s = 1 only the conditional half runs. `cells`: as in forward."""
        if cfg_scale == 1.0:
            return self(inputs, labels, None, cells).float()
        b = inputs.shape[0]
        drop = torch.arange(2 * b, device=inputs.device) >= b
        both_cells = None if cells is None else cells.repeat(2, 1)
        both = self(inputs.repeat(2, 1), labels.repeat(2), drop, both_cells).float()
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def _step_log_probs(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        cells: torch.Tensor,
        cfg_scale: float,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
    ) -> torch.Tensor:
        """Log-probabilities (B, n, K) of the distribution the codes of `cells` (B, n) are drawn
        from at one step."""
        logits = self.guided_logits(inputs, labels, cfg_scale, cells) / temperature
        return filter_logits(logits, top_k, top_p).log_softmax(-1)

    @torch.no_grad()
    def sample_trajectory(
        self,
        labels: torch.Tensor,
        generator: torch.Generator,
        steps: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        choice_temperature: float = 4.5,
    ) -> Trajectory:
        """Parallel decoding from an all-masked grid in `steps` steps (see `masking_schedule`).

        Each step draws a code for every masked cell, then keeps those whose drawn code has the
        highest log-probability plus Gumbel noise scaled by
        `choice_temperature` * (1 - t/T), annealed to 0 at the last step; the others are
        masked again. All draws come from `generator` on its own device.
        """
        _check_sampling(cfg_scale, temperature, choice_temperature)
        b, n, g_dev = labels.shape[0], self.seq_len, generator.device
        codes = torch.full((b, n), self.mask_token, dtype=torch.long, device=labels.device)
        inputs, fixed, logps = [], [], []
        masked = n
        for t, masked_after in enumerate(masking_schedule(n, steps), start=1):
            cells = _cells_of(codes == self.mask_token, masked)
            logp = self._step_log_probs(codes, labels, cells, cfg_scale, temperature, top_k, top_p)
            draws = sample_categorical(logp.exp().flatten(0, 1), generator).view(cells.shape)
            draw_logp = logp.gather(-1, draws[..., None]).squeeze(-1)
            u = torch.rand(cells.shape, generator=generator, device=g_dev).to(labels.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
            confidence = draw_logp + choice_temperature * (1.0 - t / steps) * gumbel
            chosen = confidence.topk(masked - masked_after, dim=1).indices
            masked = masked_after
            where = cells.gather(1, chosen)
            inputs.append(codes.clone())
            fixed.append(torch.zeros_like(codes, dtype=torch.bool).scatter_(1, where, True))
            logps.append(draw_logp.gather(1, chosen).sum(1))
            codes = codes.scatter(1, where, draws.gather(1, chosen))
        return Trajectory(torch.stack(inputs), torch.stack(fixed), codes, torch.stack(logps, 1))

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        steps: int = 8,
        choice_temperature: float = 4.5,
    ) -> torch.Tensor:
        """Draw codes (B, h, w) for `labels` (B,) by parallel decoding (`sample_trajectory`)."""
        traj = self.sample_trajectory(
            labels, generator, steps, temperature, top_k, top_p, cfg_scale, choice_temperature
        )
        return traj.codes.view(labels.shape[0], *self.grid)

    def step_log_probs(
        self,
        traj: Trajectory,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """(B, T) log-probability of the codes fixed at each step of `traj` under the current
        weights and the given sampling settings; differentiable, for RL ratios."""
        _check_sampling(cfg_scale, temperature, 0.0)
        cols = []
        for inputs, fixed in zip(traj.inputs, traj.fixed, strict=True):
            cells = _cells_of(fixed, int(fixed[0].sum()))
            logp = self._step_log_probs(inputs, labels, cells, cfg_scale, temperature, top_k, top_p)
            codes = traj.codes.gather(1, cells)
            cols.append(logp.gather(-1, codes[..., None]).squeeze(-1).sum(1))
        return torch.stack(cols, dim=1)

    def log_prob(
        self,
        traj: Trajectory,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """(B,) sum over steps of `step_log_probs`: the policy log-probability of a sample."""
        return self.step_log_probs(traj, labels, cfg_scale, temperature, top_k, top_p).sum(1)


def _cells_of(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n), ascending, of the True cells of a (B, L) mask with n of them in every
    row; a sort rather than nonzero, whose data-dependent size would stall a GPU each step."""
    return mask.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :n]


def _check_sampling(cfg_scale: float, temperature: float, choice_temperature: float) -> None:
    check_sampling(cfg_scale, temperature)
    if choice_temperature < 0:
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")


class MaskGITKind(CodeTransformerKind):
    name = "maskgit"
    module = MaskGITPrior
    cfg_scale = 1.0  # digits: 2.0 (AR's) cost 0.25 of recall and 2.8x the FID ratio, measured

    def sampling(self, cfg: Prior) -> dict[str, Any]:
        return {
            **super().sampling(cfg),
            "steps": cfg.decoding_steps,
            "choice_temperature": cfg.choice_temperature,
        }

    def validate(
        self, net: nn.Module, settings: Settings, x: Tensor, y: Tensor, seed: int
    ) -> Metrics:
        assert isinstance(net, MaskGITPrior)
        return {"val_nll_bits_per_code_bound": net.nll_bits_per_code(x, y, seed)}

    def sample_codes(self, gen: Generator, labels: Tensor, rng: RNG, **s: Any) -> Tensor:
        assert isinstance(gen.prior, MaskGITPrior)
        return gen.prior.sample(
            labels,
            rng,
            **token_sampling(s),
            steps=min(s.get("steps", 8), gen.prior.seq_len),
            choice_temperature=s.get("choice_temperature", 4.5),
        )

    def policy(
        self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float
    ) -> MaskGITPolicy:
        return MaskGITPolicy(gen, reference, cfg, cfg_scale)


class MaskGITPolicy:
    """Parallel decoding as a policy: a whole trajectory is one action, scored by the sum over
    steps of the log-probabilities of the codes fixed at each step (`MaskGITPrior.log_prob`).
    Steps and choice temperature are the prior's own; like `ar`, RL draws at
    `finetune.temperature` without top-k/top-p truncation, so its log-probabilities are exact."""

    def __init__(
        self, gen: Generator, reference: nn.Module, cfg: Finetune, cfg_scale: float
    ) -> None:
        assert isinstance(gen.prior, MaskGITPrior) and isinstance(reference, MaskGITPrior)
        self.tokenizer, self.net, self.reference = gen.tokenizer, gen.prior, reference
        self.cfg_scale, self.temperature = cfg_scale, cfg.temperature
        self.steps = min(int(gen.sampling.get("steps", 8)), gen.prior.seq_len)
        self.choice_temperature = float(gen.sampling.get("choice_temperature", 4.5))

    def _log_prob(self, net: MaskGITPrior, traj: Trajectory, labels: Tensor) -> Tensor:
        return net.log_prob(traj, labels, self.cfg_scale, self.temperature)[:, None]

    def rollout(self, labels: Tensor, generator: RNG) -> Rollout:
        with torch.no_grad():
            traj = self.net.sample_trajectory(
                labels,
                generator,
                self.steps,
                self.temperature,
                cfg_scale=self.cfg_scale,
                choice_temperature=self.choice_temperature,
            )
            old = self._log_prob(self.net, traj, labels)
            ref = self._log_prob(self.reference, traj, labels)
            images = self.tokenizer.decode_codes(traj.codes.view(-1, *self.net.grid))
        return Rollout(labels, images, old, ref, traj, 1)

    def log_prob(self, rollout: Rollout) -> Tensor:
        return self._log_prob(self.net, rollout.replay, rollout.labels)


KIND = MaskGITKind()
