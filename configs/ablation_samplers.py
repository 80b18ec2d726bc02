# Samplers x steps on the bundled tiny model, each cell scored by the attribute classifier (prompt fidelity).
#   python -m sampling.ablate --config configs/ablation_samplers.py [--model M]
import numpy as np

from data.evaluate import caption_fidelity
from data.procedural import caption, random_character

rng = np.random.default_rng(1000)
config = dict(
    model="plainxl-tiny",
    prompts=[caption(random_character(rng)) for _ in range(8)],  # procedural captions the classifier can read back
    grid=dict(sampler=["euler", "euler_a", "dpmpp_2m", "ddim"], steps=[4, 8, 20], cfg=[5.0], seed=[0, 1]),
    score=caption_fidelity,
    width=64,
    height=64,
)
