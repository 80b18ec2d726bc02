# FreeU on and off (its published SDXL factors, sampling/interventions.py) over a few cfg scales on the bundled
# tiny model, scored by the attribute classifier.
#   python -m sampling.ablate --config configs/ablation_freeu.py [--model M]
import numpy as np

from data.evaluate import caption_fidelity
from data.procedural import caption, random_character
from sampling.interventions import freeu

rng = np.random.default_rng(2000)
config = dict(
    model="plainxl-tiny",
    prompts=[caption(random_character(rng)) for _ in range(8)],
    grid=dict(sampler=["euler_a"], steps=[20], cfg=[3.0, 5.0, 8.0], intervention=["none", "freeu"], seed=[0, 1]),
    interventions=dict(freeu=freeu),
    score=caption_fidelity,
    width=64,
    height=64,
)
