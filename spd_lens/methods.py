"""The methods compared, each a composition of the library's pieces.

| method        | self-generation (training data)                 | trained | evaluated with        |
|---------------|-------------------------------------------------|---------|-----------------------|
| `base`        | none                                            | no      | the model             |
| `psr`         | raw samples, no projection                      | yes     | the trained model     |
| `ssd`         | raw samples at a shifted temperature (ssd.*)    | yes     | the trained model     |
| `spd`         | raw samples with K/V projected on the gradient subspace | yes | the trained model |
| `spd-random`  | same, on a random subspace of the same ranks    | yes     | the trained model     |
| `spd-fullseq` | same, on the subspace of the full-sequence loss | yes     | the trained model     |
| `hook-only`   | none                                            | no      | the model with the gradient projection hooks |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    sampling: str | None  # "plain", "ssd" or "projected"; None = no training
    subspace: str | None  # "gradient", "random" or "fullseq": for projected sampling or hook-only eval
    eval_hooks: bool = False
    seeded: bool = True  # depends on the seed (sampling, training); base / hook-only are greedy


METHOD_TABLE: dict[str, Method] = {
    "base": Method("base", None, None, seeded=False),
    "psr": Method("psr", "plain", None),
    "ssd": Method("ssd", "ssd", None),
    "spd": Method("spd", "projected", "gradient"),
    "spd-random": Method("spd-random", "projected", "random"),
    "spd-fullseq": Method("spd-fullseq", "projected", "fullseq"),
    "hook-only": Method("hook-only", None, "gradient", eval_hooks=True, seeded=False),
}
