"""The model catalog: which models exist, what they cost, who serves them, and how a name becomes a plan.

A *candidate* is one (model, provider) pair: the unit that is raced, measured and cooled down. A *plan*
is what a requested model name resolves to: the route settings and its candidates in config order
(ordering by health and speed happens later, in `feedback`, because it changes with every request).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ModelConfig, ProviderConfig, RouteConfig
from .errors import ApiError


@dataclass(frozen=True, slots=True)
class Candidate:
    model: ModelConfig
    provider: ProviderConfig
    upstream_model: str
    key: str  # "provider/upstream_model": the identity used by statistics and metrics
    endpoint: str  # "model@provider": what X-GammaInfra-Endpoint says

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        m = self.model
        return (prompt_tokens * m.input_usd_per_mtok + completion_tokens * m.output_usd_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class Plan:
    name: str  # the model name the caller asked for
    route: RouteConfig
    candidates: tuple[Candidate, ...]

    @property
    def strategy(self) -> str:
        return self.route.strategy


class Catalog:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._candidates: dict[str, tuple[Candidate, ...]] = {}
        for name, m in config.models.items():
            self._candidates[name] = tuple(
                Candidate(
                    model=m,
                    provider=config.providers[s.provider],
                    upstream_model=s.model,
                    key=f"{s.provider}/{s.model}",
                    endpoint=f"{name}@{s.provider}",
                )
                for s in m.serve
            )
        self._plans: dict[str, Plan] = {}
        for name, route in config.routes.items():
            self._plans[name] = Plan(name, route, self.expand(route.candidates))
        for name, m in config.models.items():
            pinned = RouteConfig(
                name=name, strategy="failover", candidates=(name,), max_attempts=max(3, len(m.serve))
            )
            self._plans[name] = Plan(name, pinned, self._candidates[name])

    def expand(self, model_names: tuple[str, ...] | list[str]) -> tuple[Candidate, ...]:
        """Models -> their (model, provider) candidates, in order, without duplicates."""
        seen: set[str] = set()
        out: list[Candidate] = []
        for name in model_names:
            for c in self._candidates[name]:
                if c.endpoint not in seen:
                    seen.add(c.endpoint)
                    out.append(c)
        return tuple(out)

    def all_candidates(self) -> tuple[Candidate, ...]:
        return self.expand(list(self.config.models))

    def resolve(self, name: str) -> Plan:
        plan = self._plans.get(name)
        if plan is None:
            raise ApiError(
                404,
                f"The model '{name}' does not exist. GET /v1/models lists the models and routes.",
                param="model",
                code="model_not_found",
            )
        return plan
