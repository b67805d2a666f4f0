"""The arm option `moe:` for mixture-of-experts models: how experts are calibrated.

    moe: {starved: rtn | all_tokens | fp16, min_tokens: N, weighting: tokens | routing}

- `min_tokens`: an expert whose router sent it fewer calibration tokens is starved. Default (null): the
  block's input width (hidden size): with fewer tokens than input columns an expert's Hessian
  (2/N) sum x x^T is rank-deficient, and GPTQ would fit those few tokens rather than the weights.
- `starved`: what a starved expert gets. `rtn` (default): round to nearest with the arm's codec, no
  statistics (an expert no token reached has H = 0, which GPTQ would treat as all-dead columns and zero);
  `fp16`: left unquantized, stored and counted at 16 bits; `all_tokens`: statistics from every
  calibration token run through the expert (for statistics only: the forward pass and the routing are
  unchanged), llm-compressor's "calibrate all experts" for the experts that need it. A `min_tokens`
  above the calibration token count makes every expert starved (all of them calibrated on every token).
- `weighting`: `tokens` (default: each routed token counts once, as llama.cpp's imatrix and the
  per-expert hooks of llm-compressor/GPTQModel count them) or `routing` (token t's terms weighted by the
  square of its routing weight, as the block scales the expert's output); why in models/moe.py.

Pydantic only, no torch: the spec validates it (quant/steps/moe.py registers the arm key).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    starved: Literal["rtn", "all_tokens", "fp16"] = "rtn"
    min_tokens: int | None = Field(None, ge=0)
    weighting: Literal["tokens", "routing"] = "tokens"

    def threshold(self, plans) -> int:
        """Tokens under which an expert is starved: `min_tokens`, else the input width of the MoE blocks
        the plans (quant/recipe.py TensorPlans) reach (0 when they reach none)."""
        if self.min_tokens is not None:
            return self.min_tokens
        moe = next((p.target.moe for p in plans if getattr(p.target, "moe", None) is not None), None)
        return 0 if moe is None else int(moe.router.shape[1])
