from setuptools import find_packages, setup

setup(
    name="plainxl",
    version="0.1.0",
    description="A from-scratch, readable PyTorch reimplementation of Stable Diffusion XL.",
    python_requires=">=3.11",
    packages=find_packages(include=["models*", "sampling*", "train*", "data*", "configs*"]),
    package_data={"models": ["tokenizer/*", "plainxl-tiny.safetensors", "plainxl-tiny-refiner.safetensors"], "data": ["classifier.safetensors"]},
    install_requires=[
        "torch>=2.3",
        "safetensors>=0.4",
        "transformers>=4.40",  # CLIPTokenizer only
        "huggingface_hub>=0.23",
        "numpy",
        "einops",
        "tensorboard",
        "Pillow",
        "tqdm",
        "torchsde",  # Brownian noise for the SDE samplers (sampling/noise.py)
    ],
    extras_require={
        # diffusers (and peft, for its LoRA loading) are the test oracles only: project code never imports them.
        # nbclient, nbformat and ipykernel execute the notebooks in the test suite; hypothesis draws damaged files; ruff is the linter .ci/run runs.
        # k-diffusion (the samplers' oracle) is installed by .ci/run with --no-deps: its own dependencies pull torchvision.
        "test": ["pytest", "hypothesis", "ruff", "diffusers==0.42.1", "peft", "accelerate", "nbclient", "nbformat", "ipykernel",
                 "torchdiffeq", "scipy", "lycoris-lora==4.1.3"],  # lycoris-lora: tests/test_lycoris.py; k-diffusion's sampling.py imports them (it is installed with --no-deps)
    },
)
