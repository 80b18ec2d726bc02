# Full-UNet DreamBooth of one anime character on animagine-xl-4.0 within one 24 GB GPU: animagine_character.py's
# run and data with Adafactor, bf16 weights (stochastically rounded updates), fused_backward and cached text
# embeddings. Budgeted at 10.0 GiB per GPU on the meta device (tests/benchmarks/bench_train_step.py: 11.5 GiB less
# the bf16 text encoders' 1.5), not yet measured on a GPU.
#   python -m train.dreambooth --config configs/animagine_character_24gb.py --instance_data_dir=my_character
from configs.animagine_character import config as full_fine_tuning

config = full_fine_tuning | dict(
    optimizer="adafactor",
    lr=6e-5,  # Adafactor's step is lr x RMS(w): AdamW's 2e-6 over the UNet's typical weight RMS of ~0.03
    master_dtype="bf16",
    fused_backward=True,
    grad_accum=1,  # fused_backward cannot accumulate; the global batch is batch_size x processes
    cache_text_embeddings=True,  # the frozen text encoders encode each prompt once, then wait on the CPU (-1.5 GiB)
    output_dir="runs/my_character_24gb",
)
