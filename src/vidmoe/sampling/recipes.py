"""Named few-step sampling recipes: the settings that published step-distilled adapters were
trained for, so `--recipe NAME` reproduces them. A recipe only fills settings the user left
unset; anything given explicitly wins. The adapters themselves are loaded with `--lora`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vidmoe.sampling.settings import GenerateSettings


@dataclass(frozen=True)
class Recipe:
    """Sampling settings of one published few-step recipe, and where they come from."""

    name: str
    description: str
    settings: dict[str, Any]
    """`GenerateSettings` field -> value."""
    source: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="lightning-4step",
            description=(
                "Wan2.2-Lightning / lightx2v 4-step LoRAs (T2V and I2V A14B): Euler on the "
                "shift-5 grid [1, 0.9375, 0.8333, 0.625], 2 high-noise + 2 low-noise steps, "
                "no classifier-free guidance"
            ),
            settings=dict(
                sampler="euler",
                shift=5.0,
                steps_per_expert={"high_noise": 2, "low_noise": 2},
                guidance={"high_noise": 1.0, "low_noise": 1.0},
            ),
            # Their configs (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py): sample_steps=4,
            # sample_shift=5.0, sample_guide_scale=(1.0, 1.0), boundary 0.875 / 0.900, which on
            # this grid gives 2 + 2 steps; the solver (wan/utils/fm_solvers_euler.py) is Euler on
            # shift(linspace(1, 0, steps + 1)), our 'euler' grid.
            source="github.com/ModelTC/Wan2.2-Lightning (README, wan/configs, wan/utils/fm_solvers_euler.py); "
            "huggingface.co/lightx2v/Wan2.2-Lightning",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def apply_recipe(s: GenerateSettings, name: str) -> GenerateSettings:
    """`s` with the recipe's values in every field the user left unset (None or empty).

    A user's `--steps N`, `--timesteps` or `--boundary` replaces the recipe's per-expert split; per-expert
    guidance given by the user is merged over the recipe's.
    """
    recipe = get_recipe(name)
    fields = {}
    for key, value in recipe.settings.items():
        current = getattr(s, key)
        if key == "guidance":
            fields[key] = {**value, **current}
        elif key == "steps_per_expert":
            if not current and s.num_steps is None and s.sigmas is None and s.boundary is None:
                fields[key] = dict(value)
        elif current is None:
            fields[key] = value
    return dataclasses.replace(s, **fields)
