"""The DreamBooth demonstration on the bundled tiny model, measured as in the paper (Ruiz et al. 2023):
subject fidelity, prompt fidelity and class diversity, with prior preservation on and off.

The subject is a character the model has never seen: procedural's default distribution has no
heterochromia and no star hairpin. Five pictures of her (pose jitter only) teach "1girl, sks"; the
class prompt is "1girl". The attribute classifier (data.classifier) then reads generations:

- subject fidelity: of "1girl, sks" images, the share of her identity (hair colour and length, each
  eye's colour, the star hairpin) that the classifier reads as hers;
- prompt fidelity: of "1girl, sks, <expression>, <colour> background" images, with an expression and
  background she was never shown with, the share of those two tags that come out as asked;
- class diversity: of "1girl" images, the entropy of what the classifier reads, per attribute,
  divided by the entropy of a uniform choice (1: as varied as can be, 0: one character every time);
  and the subject leak, the share of "1girl" images with a star hairpin or heterochromia.

    python -m train.demo [--out runs/demo] [--model plainxl-tiny] [--count 64] [--field=value ...]

Extra --field=value arguments go to both training runs (configs/tiny_dreambooth.py holds the rest).
Writes OUT/results.json and OUT/grid.png (rows: before training, then full fine-tuning and LoRA, each with
prior preservation on and off). Each trained row also gives the size of what it exports and its training
time (the sum of its steps' times: no loading, class images or export).
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data import classifier, evaluate
from data.procedural import BACKGROUNDS, EXPRESSIONS, Character, draw
from models.files import output_or_exit
from sampling.pipeline import Pipeline, Settings
from train import dreambooth

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_dreambooth.py"
SUBJECT = Character(hair_colour="black", hair_length="long hair", eye_colour="red", second_eye_colour="blue",
                    expression="smile", accessory="star hairpin", background="white")
IDENTITY = ("hair_colour", "hair_length", "left_eye", "right_eye", "accessory")  # classifier heads that make her
INSTANCE_IMAGES = 5
GENERATION = dict(width=64, height=64, steps=20, cfg=5.0, sampler="euler_a")  # as the class images are made
LORA = {"lora_rank": 8, "lr": 2e-3}  # adapters on kohya's UNet set; LoRA wants a larger lr than full fine-tuning
RUNS = {  # name: (output folder, overrides of configs/tiny_dreambooth.py); None: the model as it is
    "before training": None,
    "prior preservation": ("prior", {"prior_loss_weight": 1.0}),
    "no prior preservation": ("no_prior", {"prior_loss_weight": 0.0}),
    "LoRA, prior preservation": ("lora_prior", {"prior_loss_weight": 1.0, **LORA}),
    "LoRA, no prior preservation": ("lora_no_prior", {"prior_loss_weight": 0.0, **LORA}),
}


def write_instance_images(folder, count=INSTANCE_IMAGES, seed=0):
    """The subject `count` times, the head shifted and scaled a little differently each time."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = draw(SUBJECT, 64, np.random.default_rng([seed, i]))
        tmp = folder / f".{i}.png.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, folder / f"{i}.png")


def new_contexts(count, seed):
    """`count` (expression, background) pairs, neither of which the instance images show."""
    rng = np.random.default_rng(seed)
    expressions = [e for e in EXPRESSIONS if e != SUBJECT.expression]
    backgrounds = [b for b in BACKGROUNDS if b != SUBJECT.background]
    return [(expressions[rng.integers(len(expressions))], backgrounds[rng.integers(len(backgrounds))])
            for _ in range(count)]


def normalised_entropy(values, vocabulary_size):
    """Entropy of the empirical distribution of `values` over log(vocabulary_size): 0 one value, 1 uniform."""
    counts = np.unique(values, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(vocabulary_size))


def measure(pipe, reader, count=64, seed=10_000):
    """The triple for one model -> (numbers, {"subject", "context", "class": images})."""
    subject = pipe(Settings(prompt="1girl, sks", seed=seed, num_images=count, **GENERATION), progress=False)
    contexts = new_contexts(count, seed)
    context = [pipe(Settings(prompt=f"1girl, sks, {e}, {b} background", seed=seed + i, **GENERATION), progress=False)[0]
               for i, (e, b) in enumerate(contexts)]
    klass = pipe(Settings(prompt="1girl", seed=seed, num_images=count, **GENERATION), progress=False)
    read = lambda images: [classifier.labels(p) for p in classifier.predict(reader, images)]
    her = classifier.labels(SUBJECT)
    subject_read, context_read, class_read = read(subject), read(context), read(klass)
    asked = [{"expression": EXPRESSIONS.index(e), "background": BACKGROUNDS.index(b)} for e, b in contexts]
    numbers = {
        "subject fidelity": np.mean([[r[h] == her[h] for h in IDENTITY] for r in subject_read]),
        "whole subject": np.mean([all(r[h] == her[h] for h in IDENTITY) for r in subject_read]),
        "prompt fidelity": np.mean([[r[h] == a[h] for h in a] for r, a in zip(context_read, asked)]),
        "subject kept in new contexts": np.mean([[r[h] == her[h] for h in IDENTITY] for r in context_read]),
        "class diversity": np.mean([normalised_entropy([r[h] for r in class_read], len(vocabulary))
                                    for h, vocabulary in classifier.ATTRIBUTES.items()]),
        "subject leak into class": np.mean([r["accessory"] == her["accessory"] or r["left_eye"] != r["right_eye"]
                                            for r in class_read]),
    }
    return {k: round(float(v), 3) for k, v in numbers.items()}, {"subject": subject, "context": context, "class": klass}


def grid(rows, per_kind=4, scale=2):
    """One row per model: per_kind images each of subject, context and class, scaled up `scale` times."""
    chosen = [im for images in rows for kind in ("subject", "context", "class") for im in images[kind][:per_kind]]
    return evaluate.grid(chosen, columns=3 * per_kind, side=64 * scale)


def table(results):
    """A markdown table: one row per model, one column per number (file size and training time: trained rows)."""
    names = list(dict.fromkeys(n for v in results.values() for n in v))
    cell = lambda v, n: "–" if n not in v else f"{v[n]:.3f}" if n not in ("file MB", "training s") else f"{v[n]:g}"
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(cell(v, n) for n in names) + " |" for run, v in results.items()]
    return "\n".join(lines)


def arguments(argv, module, doc, folders, count):
    """A demo's command line -> (args, the --field=value arguments for its runs, the output folder, whose
    `folders` are removed: nothing from another model or setting stays): --out, --model, --count."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--out", default=f"runs/{module.split('.')[-1]}", help=f"its folders {', '.join(folders)} are remade")
    parser.add_argument("--model", default="plainxl-tiny")
    parser.add_argument("--count", type=int, default=count, help="generations per measurement")
    args, overrides = parser.parse_known_args(argv)
    out = output_or_exit(args.out, "--out")  # before anything is removed or trained
    for name in folders:
        shutil.rmtree(out / name, ignore_errors=True)
    return args, overrides, out


def main(argv=None):
    folders = ["instance", "class"] + [run[0] for run in RUNS.values() if run]
    args, overrides, out = arguments(argv, "train.demo", __doc__, folders, count=64)
    write_instance_images(out / "instance")
    reader = classifier.load()

    results, images = {}, []
    for run, spec in RUNS.items():
        trained = {}
        if spec is None:
            pipe = Pipeline.load(args.model)
        else:
            folder, fields = spec
            run_dir = out / folder
            code = dreambooth.main(["--config", str(CONFIG), f"--model={args.model}", f"--instance_data_dir={out / 'instance'}",
                                    f"--class_data_dir={out / 'class'}", f"--output_dir={run_dir}", *overrides,
                                    *[f"--{k}={v}" for k, v in fields.items()]])
            if code:
                return code
            exported = run_dir / ("lora.safetensors" if fields.get("lora_rank") else "model.safetensors")
            pipe = Pipeline.load(args.model, loras=[(exported, 1.0)]) if fields.get("lora_rank") else Pipeline.load(exported)
            seconds = sum(json.loads(line)["seconds"] for line in (run_dir / "log.jsonl").read_text().splitlines())
            trained = {"file MB": round(exported.stat().st_size / 1e6, 2), "training s": round(seconds, 1)}
        results[run], generated = measure(pipe, reader, args.count)
        results[run] |= trained
        images.append(generated)
        print(f"{run}: {results[run]}", flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    grid(images).save(out / "grid.png")
    print(table(results))
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
