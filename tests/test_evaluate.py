"""The prompt-fidelity measurement: a 'model' that draws exactly what its prompt says scores ~1 on its
own prompts and far less against random prompts; one that ignores its prompt scores alike on both."""

from data import procedural
from data.evaluate import prompt_fidelity


class Oracle:
    """Stands in for a pipeline: draws the character its caption names."""

    def __call__(self, settings, progress=False):
        return [procedural.draw(procedural.parse_caption(settings.prompt), size=settings.width)]


class Ignorer:
    def __call__(self, settings, progress=False):
        return [procedural.sample(0, seed=5)[0]]


def test_prompt_fidelity_separates_following_from_ignoring():
    own, baseline, images = prompt_fidelity(Oracle(), count=40)
    assert len(images) == 40 and own["mean"] > 0.97 and baseline["mean"] < 0.6
    own, baseline, _ = prompt_fidelity(Ignorer(), count=40)
    assert own["mean"] < 0.6 and abs(own["mean"] - baseline["mean"]) < 0.2
