"""Per-row sampling for a batch: each row has its own temperature, top_p and seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    capping: bool = True


class BatchSampler:
    """Holds the batch's sampling parameters as device tensors, rebuilt only when rows change.

    Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which equals drawing from p;
    a seeded request draws its noise from its own generator, so its tokens do not depend on which
    other requests share the batch.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.seed()
        self.set_rows([], [])

    def set_rows(self, params: list[SamplingParams], generators: list[torch.Generator | None]) -> None:
        self._generators = generators
        self._all_greedy = all(p.temperature == 0 for p in params)
        self._any_top_p = any(p.top_p < 1 for p in params)
        self._temperature = torch.tensor([p.temperature for p in params], device=self.device)
        self._top_p = torch.tensor([p.top_p for p in params], device=self.device)

    @staticmethod
    def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(params.seed)
        return g

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, vocab] -> token ids [batch] on the device, with no host sync."""
        greedy = logits.argmax(-1)
        if self._all_greedy:
            return greedy
        scaled = logits.float() / self._temperature.clamp(min=1e-5).unsqueeze(-1)
        if self._any_top_p:
            scaled = self._top_p_filter(scaled)
        probs = scaled.softmax(-1)
        race = probs / self._exponential_noise(probs.shape)
        return torch.where(self._temperature == 0, greedy, race.argmax(-1))

    def _top_p_filter(self, scaled: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= self._top_p.unsqueeze(-1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)

    def _exponential_noise(self, shape: torch.Size) -> torch.Tensor:
        uniform = torch.rand(shape, generator=self._shared, device=self.device)
        for row, g in enumerate(self._generators):
            if g is not None:
                uniform[row] = torch.rand(shape[-1], generator=g, device=self.device)
        # u lies in [0, 1); the floor keeps E > 0 so p / E stays finite.
        return (-torch.log1p(-uniform)).clamp_(min=1e-20)
